"""The studio's limits: login, bounded requests, its own temp folder trimmed and removed."""

import socket
import time

import pytest
from PIL import Image

from fvg.cli import main
from fvg.io import FvgError
from fvg.studio import parse_auth
from fvg.studio.session import MAX_PROMPT_CHARS, StudioSession

pytest.importorskip("gradio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_auth_values():
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("ann:p:ss") == ("ann", "p:ss")
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(FvgError, match="must be 'user:password'"):
            parse_auth(bad)


def test_bad_auth_and_out_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FVG_STUDIO_AUTH", "nopassword")
    assert main(["studio", "--preset", "tiny"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --auth / FVG_STUDIO_AUTH must be 'user:password' with both "
                                               "parts non-empty")
    monkeypatch.delenv("FVG_STUDIO_AUTH")
    (tmp_path / "file").write_text("x")
    assert main(["studio", "--preset", "tiny", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_requests_are_bounded(tmp_path):
    session = StudioSession(tmp_path, preset="tiny")
    with pytest.raises(FvgError, match=f"at most {MAX_PROMPT_CHARS}"):
        session.plan("a dog runs " * 1000, "tiny")
    with pytest.raises(FvgError, match="at most 200 steps"):
        session.run("a dog runs", "tiny", steps=10_000)
    with pytest.raises(FvgError, match="anchor seed"):
        session.candidates("a dog", "tiny", 4, 2**32 - 2)


def test_login_temp_folder_and_cleanup(tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    from fvg.studio import app as studio_app

    session = StudioSession(tmp_path / "runs", preset="tiny")
    port = free_port()
    demo = studio_app.serve(session, "127.0.0.1", port, auth=("ann", "s3cret"))
    temp = demo.fvg_temp
    try:
        url = f"http://127.0.0.1:{port}/"
        assert httpx.get(url + "config").status_code in (401, 403)  # nothing without a login
        with pytest.raises(Exception):
            Client(url, verbose=False, auth=("ann", "wrong"))
        client = Client(url, verbose=False, auth=("ann", "s3cret"))
        image = tmp_path / "mine.png"
        Image.new("RGB", (64, 40), (10, 200, 10)).save(image)
        gallery, *_ = client.predict(handle_file(image), "tiny", api_name="/upload")
        assert len(gallery) == 1
        assert not [p for p in temp.path.rglob("mine.png")]  # the upload's copy is gone once in memory
        for i in range(5):  # anonymous files beyond the cap are trimmed, oldest first
            (temp.path / f"junk{i}.bin").write_bytes(b"x" * 10)
            time.sleep(0.01)
        old_cap = studio_app.MAX_TEMP_FILES
        studio_app.MAX_TEMP_FILES = 2
        try:
            temp.trim()
        finally:
            studio_app.MAX_TEMP_FILES = old_cap
        assert len([p for p in temp.path.rglob("*") if p.is_file()]) <= 2
    finally:
        demo.close()
    assert not temp.path.exists()


def test_a_request_over_its_time_limit_is_stopped_and_frees_the_pipeline(tmp_path):
    import math

    session = StudioSession(tmp_path, "tiny", request_timeout_s=1e-9)  # any request is over its limit at once
    with pytest.raises(FvgError, match="longer than the studio's limit"):
        session.run("a red circle moves right", mode="t2v", steps=2)
    with pytest.raises(FvgError, match="longer than the studio's limit"):
        session.candidates("a red circle on the left", num_candidates=2)
    assert session.history == [] and not any(tmp_path.iterdir())  # nothing half-saved
    session.request_timeout_s = 600.0  # the lock was released: the next request runs
    run = session.run("a red circle moves right", mode="t2v", steps=2)
    assert run.video.is_file() and len(session.history) == 1
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(FvgError, match="--request-timeout must be a positive number"):
            StudioSession(tmp_path, "tiny", request_timeout_s=bad)
