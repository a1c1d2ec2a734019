"""MiniWorld v1 constants, copied from the MiniWorld v1 spec (docs/miniworld-spec.md).

Other tools read the same videos, so nothing here may drift from the spec. Values that
the spec leaves to the implementation (placement margins beyond the spec's minimums)
are marked as ours.
"""

from __future__ import annotations

# Video format.
NUM_FRAMES = 17  # 4n + 1, as Wan models expect
SIZE = 64  # frames are SIZE x SIZE pixels
FPS = 8
LAST = NUM_FRAMES - 1  # frame 16 is the final scene

# Palette. Dicts keep the spec's order, which fixes label indices in the evaluator.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (16, 16, 16),  # default
    "white": (240, 240, 240),  # prompt ends with "on a white background"
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "orange": (245, 140, 30),
    "purple": (150, 60, 210),
    "cyan": (50, 210, 220),
}

# Objects.
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 10, "large": 16}  # diameter / side / base and height
MAX_OBJECTS = 4
MARGIN = 2  # px between every object and the frame edge (frame 0)
SEPARATION = 4  # px between the bounding boxes of two objects (frame 0)

# Events.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE_DISTANCE = 24.0  # px over the 16 frame steps
STEP = MOVE_DISTANCE / LAST  # 1.5 px per frame step
PUSH_GAP = (4, 10)  # px between pusher and pushed at frame 0
TURN_FRAME = 8  # frames 0-7 keep the initial colour, 8-16 show the new one
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("to the left of", "to the right of", "above", "below")
WHITE_SUFFIX = " on a white background"

# Categories, in T2V-CompBench's order (the spec's names).
CATEGORIES = (
    "consistent_attr",
    "dynamic_attr",
    "spatial",
    "motion_binding",
    "action_binding",
    "interaction",
    "numeracy",
)

# What "correct" means.
MIN_REGION = 12  # px: smaller connected regions are noise
FILL_RATIOS: dict[str, float] = {"circle": 0.785, "square": 1.0, "triangle": 0.5}  # area / bbox area
MIN_TRAVEL = 8.0  # px along DIR for `moves` (and for the pusher)
MIN_PUSHED_TRAVEL = 6.0  # px along DIR for the pushed object
MAX_STILL = 4.0  # px: `stays still` travels less than this
GROW_RATIO = 1.5  # area(16) / area(0) at least this for `grows`
SHRINK_RATIO = 0.67  # ... at most this for `shrinks`
