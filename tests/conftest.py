import os
import sys
from pathlib import Path

import pytest

# The real T2V-CompBench prompt files (a checkout holding prompts/N_<category>.txt), for the tests
# that compare fvg's layouts with them; those tests skip, saying so, where it is not set.
COMPBENCH = Path(os.environ["FVG_T2V_COMPBENCH"]) if os.environ.get("FVG_T2V_COMPBENCH") else None
needs_compbench = pytest.mark.skipif(COMPBENCH is None or not (COMPBENCH / "prompts").is_dir(),
                                     reason="set FVG_T2V_COMPBENCH to a T2V-CompBench checkout (with prompts/)")


@pytest.fixture(autouse=True)
def _library_logs_to_real_stderr():
    """diffusers/transformers bind their log handler to the sys.stderr of the moment; under pytest's
    capture that stream is closed after its test, and a later warning would print a logging error."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module._get_library_root_logger()  # creates the default handler if needed
        handler = module._default_handler
        if handler is not None:
            handler.setStream(sys.__stderr__)
    yield


@pytest.fixture
def fresh_accelerate_state():
    """Reset accelerate's process-wide singletons after a test that built an Accelerator."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def free_port():
    """A function returning a local TCP port that was free a moment ago (bound, read, released)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


# -- training: one synthetic data set per test module, small CPU configs on it ---------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training folder holding data/: 8 synthetic 9-frame 32x32 clips at 8 fps."""
    from fvg.train.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("train")
    write_synthetic_dataset(root / "data", num_clips=8, num_frames=9, size=32, fps=8, seed=0)
    return root


@pytest.fixture(scope="module")
def train_defaults() -> dict:
    """Settings a test module adds to every `config(...)` (override this fixture in the module)."""
    return {}


@pytest.fixture(scope="module")
def config(workdir, train_defaults):
    """`config(name, **settings)`: a small CPU TrainConfig on `workdir`'s data, writing to workdir/name."""
    from fvg.train.config import TrainConfig

    def make(name: str, **settings):
        base = dict(data=str(workdir / "data"), output_dir=str(workdir / name), cache_dir=str(workdir / "cache"),
                    height=32, width=32, num_frames=9, fps=8, num_workers=0, lr_warmup_steps=0, batch_size=2,
                    mixed_precision="no", gradient_checkpointing=False, log_with="none", seed=0)
        return TrainConfig(**{**base, **train_defaults, **settings})

    return make


def save_tiny_two_expert_wan(path: Path) -> Path:
    """A saved tiny two-expert Wan checkpoint (model_index.json names transformer_2), as Wan2.2-A14B ships."""
    import torch
    from diffusers import WanTransformer3DModel

    from fvg.animate.wan import AnchoredWanPipeline
    from fvg.tiny import tiny_wan_components

    components = tiny_wan_components()
    torch.manual_seed(5)
    low_noise = WanTransformer3DModel(**components["transformer"].config).eval()
    AnchoredWanPipeline(**components, transformer_2=low_noise, boundary_ratio=0.875).save_pretrained(path)
    return path
