"""`fvg studio`: the controller called directly, then the whole app through Gradio's API (tiny preset)."""

import json

import numpy as np
import pytest
from PIL import Image

from fvg.anchor import AnchorCandidate, AnchorResult
from fvg.cli import main
from fvg.io import FvgError, read_mp4, slug
from fvg.studio.session import StudioSession, sampling_defaults

pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # Gradio vs pandas 3, not ours

PROMPT = "a red circle moves right"
VIDEO_SHAPE = (9, 32, 32, 3)  # the tiny preset: 9 frames of 32x32


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return StudioSession(tmp_path_factory.mktemp("studio"), preset="tiny")


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


# -- the controller --------------------------------------------------------------------------


def test_defaults_slug_and_bad_preset(tmp_path):
    assert sampling_defaults("tiny", "factorized") == (15, 5.0)
    assert sampling_defaults("tiny", "t2v")[0] == 50
    assert slug("  A Cat, on a Skateboard!! ") == "a-cat-on-a-skateboard"
    assert slug("???") == "run"
    with pytest.raises(FvgError, match="unknown preset 'nope'"):
        StudioSession(tmp_path, preset="nope")


def test_pipelines_are_cached_per_preset(session):
    assert session.pipeline("tiny") is session.pipeline("tiny") is session.pipeline()


def test_plan_and_candidates(session):
    plan = session.plan(f"  {PROMPT} ", "tiny")
    assert plan.prompt == PROMPT and plan.first_frame_caption and plan.upsampled_prompt
    assert session.plan_for(PROMPT, "tiny", plan) is plan
    assert session.plan_for("a blue square falls", "tiny", plan).prompt == "a blue square falls"
    seen = []
    anchor = session.candidates("a red circle on the left", "tiny", 3, seed=7,
                                progress=lambda *a: seen.append(a))
    assert [c.seed for c in anchor.candidates] == [7, 8, 9] and anchor.selected == 0
    assert anchor.caption == "a red circle on the left"
    assert all(c.image.size == (32, 32) for c in anchor.candidates)
    assert seen[-1] == ("anchor", 3, 3)
    picked = session.pick(anchor, 2)
    assert picked.selected == 2 and picked.image is anchor.candidates[2].image and anchor.selected == 0


@pytest.mark.parametrize("call, message", [
    (lambda s: s.plan("   "), "type a prompt first"),
    (lambda s: s.candidates("", "tiny"), "caption is empty"),
    (lambda s: s.candidates("a cat", "tiny", 0), "between 1 and 8"),
    (lambda s: s.pick(None, 0), "no anchor candidates yet"),
    (lambda s: s.run("", "tiny"), "type a prompt first"),
    (lambda s: s.run(PROMPT, "tiny", mode="i2v"), "unknown mode 'i2v'"),
    (lambda s: s.run(PROMPT, "tiny", steps=0), "steps must be at least 1"),
])
def test_bad_input_is_a_readable_error(session, call, message):
    with pytest.raises(FvgError, match=message):
        call(session)


def test_pick_out_of_range(session):
    anchor = AnchorResult([AnchorCandidate(Image.new("RGB", (32, 32)), 0)])
    with pytest.raises(FvgError, match="candidate 3 does not exist: choose 0 to 0"):
        session.pick(anchor, 3)


def test_upload_fits_good_images_and_rejects_bad_ones(session, tmp_path):
    good = tmp_path / "wide.jpg"
    Image.new("RGB", (96, 48), (200, 30, 30)).save(good)
    anchor = session.upload(good, "tiny")
    assert anchor.source == "file" and anchor.image.size == (32, 32)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    (tmp_path / "anim.png").write_bytes((tmp_path / "anim.gif").read_bytes())
    for name, reason in [("junk.png", "cannot read image junk.png"),
                         ("anim.png", "unsupported image format GIF in anim.png"),
                         ("missing.png", "not found: missing.png")]:
        with pytest.raises(FvgError, match=reason) as info:
            session.upload(tmp_path / name, "tiny")
        assert str(tmp_path) not in str(info.value)  # the user's file name, not the server's upload path
    with pytest.raises(FvgError, match="no image was uploaded"):
        session.upload(None, "tiny")


def test_run_with_edited_caption_chosen_candidate_and_comparison(session):
    plan = session.plan(PROMPT, "tiny")
    edited = "a small red circle at the left edge, edited"
    anchor = session.candidates(edited, "tiny", 3, seed=4)
    seen = []
    run = session.run(PROMPT, "tiny", "factorized", seed=3, steps=2, plan=plan, caption=edited, anchor=anchor,
                      selected=1, compare=True, progress=lambda *a: seen.append(a))
    out = run.out_dir
    assert out.parent == session.out_root and out.name.endswith("-a-red-circle-moves-right")
    assert [p.name for p in run.files] == ["video.mp4", "anchor.png", "plan.json", "run.json"]
    assert read_mp4(run.video).shape == VIDEO_SHAPE
    assert read_mp4(run.compare_video).shape == VIDEO_SHAPE and run.compare_video == out / "t2v" / "video.mp4"
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["00.png", "01.png", "02.png"]
    assert np.array_equal(np.asarray(Image.open(out / "anchor.png")), np.asarray(anchor.candidates[1].image))
    assert read_json(out / "plan.json")["first_frame_caption"] == edited
    record = read_json(out / "run.json")
    assert record["anchor"]["selected"] == 1 and record["anchor"]["seeds"] == [4, 5, 6]
    assert record["anchor"]["caption"] == edited and record["seed"] == 3 and record["steps"] == 2
    studio = record["settings"]["studio"]
    assert studio["first_frame_caption_edited"] and not studio["upsampled_prompt_edited"]
    assert studio["planner_first_frame_caption"] == plan.first_frame_caption
    t2v = read_json(out / "t2v" / "run.json")
    assert t2v["mode"] == "t2v" and t2v["seed"] == 3 and t2v["steps"] == 2 and t2v["anchor"] is None
    assert ("animate", 2, 2) in seen and ("t2v animate", 2, 2) in seen
    assert session.history[-1] is run and session.history_rows()[0][2] == "factorized + t2v"


def test_run_fills_in_missing_stages_and_other_modes(session):
    one_click = session.run(PROMPT, "tiny", steps=1)  # no plan, no anchor: plan and render one here
    record = read_json(one_click.out_dir / "run.json")
    assert record["anchor"]["seeds"] == [0] and read_json(one_click.out_dir / "plan.json")["prompt"] == PROMPT
    upsampled = session.run(PROMPT, "tiny", "upsampled", steps=1, upsampled="a detailed red circle video")
    assert read_json(upsampled.out_dir / "run.json")["video_prompt"] == "a detailed red circle video"
    t2v = session.run(PROMPT, "tiny", "t2v", steps=1, guidance=2.5)
    assert [p.name for p in t2v.files] == ["video.mp4", "run.json"]
    assert read_json(t2v.out_dir / "run.json")["settings"]["guidance_scale"] == 2.5
    assert len({one_click.out_dir, upsampled.out_dir, t2v.out_dir}) == 3  # same second: distinct folders


def test_anchor_of_another_size_is_refused(session):
    small = AnchorResult([AnchorCandidate(Image.new("RGB", (16, 16)), 0)], caption="x")
    with pytest.raises(FvgError, match="anchor is 16x16 but preset 'tiny' makes 32x32"):
        session.run(PROMPT, "tiny", steps=1, anchor=small)


def test_cli_studio_command(capsys):
    assert main(["studio", "--help"]) == 0
    assert "--host" in capsys.readouterr().out
    assert main(["studio", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["studio", "--port", "0"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


# -- the app through Gradio's API --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    pytest.importorskip("gradio")
    from fvg.studio.app import serve

    studio = StudioSession(tmp_path_factory.mktemp("served"), preset="tiny")
    port = free_port()
    demo = serve(studio, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}/", studio
    demo.close()


def test_api_whole_flow(server):
    from gradio_client import Client

    url, studio = server
    client = Client(url, verbose=False)
    caption, upsampled, note = client.predict(PROMPT, "tiny", api_name="/plan")
    assert caption and upsampled and "rules" in note
    edited = caption + ", seen from above"
    gallery, selected, chosen, caption_out, _, note = client.predict(PROMPT, edited, "tiny", 3, 10,
                                                                     api_name="/candidates")
    assert len(gallery) == 3 and selected == 0 and caption_out == edited
    assert [g["caption"] for g in gallery] == ["#0 seed 10", "#1 seed 11", "#2 seed 12"]
    chosen, note = client.predict(2, api_name="/pick")
    assert note == "Chose candidate #2."
    video, compare, files, note, history, _ = client.predict(
        PROMPT, edited, upsampled, "tiny", "factorized", 5, 2, 5.0, True, 2, api_name="/animate")
    assert read_mp4(video).shape == VIDEO_SHAPE and read_mp4(compare).shape == VIDEO_SHAPE
    assert sorted(f.rsplit("/", 1)[-1] for f in files) == ["anchor.png", "plan.json", "run.json", "video.mp4"]
    assert "Saved **factorized** run" in note and "random weights" in note
    run = studio.history[-1]
    assert history["data"][0][-1] == str(run.out_dir)
    record = read_json(run.out_dir / "run.json")
    assert record["anchor"]["selected"] == 2 and record["anchor"]["seeds"] == [10, 11, 12]
    assert record["anchor"]["caption"] == edited


def test_api_errors_are_messages_not_tracebacks(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False)
    with pytest.raises(AppError) as info:
        client.predict("   ", "tiny", api_name="/plan")
    assert str(info.value) == "type a prompt first"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(AppError, match=r"^cannot read image broken\.png"):
        client.predict(handle_file(tmp_path / "broken.png"), "tiny", api_name="/upload")
    with pytest.raises(AppError, match="no anchor candidates yet"):
        client.predict(0, api_name="/pick")


def test_api_concurrent_runs_are_queued_not_mixed(server):
    from gradio_client import Client

    url, studio = server
    before = len(studio.history)
    args = [("a green square falls", 1), ("a blue circle rises", 2)]
    jobs = [Client(url, verbose=False).submit(p, "", "", "tiny", "t2v", seed, 1, 5.0, False, 0,
                                              api_name="/animate") for p, seed in args]
    results = [job.result(timeout=120) for job in jobs]
    runs = studio.history[before:]
    assert len(runs) == 2 and {r.output.prompt for r in runs} == {p for p, _ in args}
    for (prompt, seed), result in zip(args, results):
        record = read_json(next(r for r in runs if r.output.prompt == prompt).out_dir / "run.json")
        assert record["seed"] == seed and read_mp4(result[0]).shape == VIDEO_SHAPE


def test_api_upload_regenerate_and_busy_port(server, tmp_path):
    from gradio_client import Client, handle_file

    from fvg.studio.app import serve

    url, studio = server
    client = Client(url, verbose=False)
    *_, new_seed = client.predict(PROMPT, "a red circle", "tiny", 2, 10, api_name="/regenerate")
    assert new_seed == 12
    own = tmp_path / "mine.png"
    Image.new("RGB", (64, 40), (10, 200, 10)).save(own)
    gallery, selected, chosen, note = client.predict(handle_file(own), "tiny", api_name="/upload")
    assert len(gallery) == 1 and selected == 0 and "mine.png" in note
    video, *_ = client.predict(PROMPT, "", "", "tiny", "factorized", 0, 1, 5.0, False, 0, api_name="/animate")
    assert read_mp4(video).shape == VIDEO_SHAPE
    record = read_json(studio.history[-1].out_dir / "run.json")
    assert record["anchor"]["source"] == "file" and record["anchor"]["seeds"] == [None]
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with pytest.raises(FvgError, match=f"cannot start the studio on 127.0.0.1:{port}.*choose another --port"):
        serve(studio, "127.0.0.1", port)
