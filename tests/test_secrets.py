"""No credential reaches a file, a log or the terminal; the plan cache keeps endpoints apart."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler
from socketserver import ThreadingTCPServer

import pytest

from fvg.cli import main
from fvg.plan import make_planner
from fvg.plan.llm import redact, secrets_of_url

KEY_IN_ENV = "sk-plantedEnvKey0123456789"
KEY_IN_USERINFO = "plantedUserinfoSecret42"
KEY_IN_QUERY = "plantedQuerySecret77"
PLANTED = (KEY_IN_ENV, KEY_IN_USERINFO, KEY_IN_QUERY)


class EchoServer:
    """Answers every request with `status` and a body that echoes the request's headers and path,
    as careless servers and proxies do in their error pages."""

    def __init__(self, status: int = 401):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append(self.path)
                if status == 200:
                    answer = {"first_frame_caption": "a dog standing", "upsampled_prompt": "a dog runs left"}
                    data = json.dumps({"choices": [{"message": {"content": json.dumps(answer)}}]}).encode()
                else:
                    data = json.dumps({"error": "unauthorized", "path": self.path,
                                       "received_headers": dict(self.headers)}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, credentials: bool = True) -> str:
        if not credentials:
            return f"http://127.0.0.1:{self.port}/v1"
        return f"http://apiuser:{KEY_IN_USERINFO}@127.0.0.1:{self.port}/v1?api_key={KEY_IN_QUERY}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.close()


def assert_no_secret(text: str, where: str) -> None:
    for secret in PLANTED:
        assert secret not in text, f"{secret} leaked into {where}"


def test_planted_keys_reach_no_output_file_log_or_terminal(echo_server, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("FVG_TEST_SECRET_KEY", KEY_IN_ENV)
    caplog.set_level(logging.DEBUG)  # every logger, httpx's request lines included
    out, cache = tmp_path / "run", tmp_path / "cache"
    code = main(["generate", "a dog runs to the left", "--preset", "tiny", "--steps", "1", "--out", str(out),
                 "--planner", "openai", "--planner-model", "m", "--planner-url", echo_server.url(),
                 "--api-key-env", "FVG_TEST_SECRET_KEY", "--plan-cache", str(cache)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert echo_server.requests, "the planner never called the server"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["backend"] == "rules" and "HTTP 401" in plan["warnings"][0]  # the server's answer is kept...
    assert "***" in plan["warnings"][0]  # ...with its credentials masked
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"plan.json", "run.json"} <= {p.name for p in files}
    for path in files:
        assert_no_secret(path.read_bytes().decode("utf-8", "replace"), str(path))
        assert_no_secret(path.name, f"the file name {path}")
    assert_no_secret(captured.out + captured.err, "the terminal")
    assert_no_secret("\n".join(r.getMessage() for r in caplog.records), "the logs")


def test_cache_key_includes_the_endpoint_but_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("FVG_TEST_SECRET_KEY", KEY_IN_ENV)
    a, b = EchoServer(status=200), EchoServer(status=200)
    try:
        for server in (a, b):
            planner = make_planner("openai", model="m", base_url=server.url(), cache_dir=tmp_path,
                                   api_key_env="FVG_TEST_SECRET_KEY")
            assert not planner.plan("a dog runs").cached
            assert_no_secret(planner.endpoint, "the cache key's endpoint")
        assert len(a.requests) == len(b.requests) == 1  # two servers never share a plan
        rotated = a.url().replace(KEY_IN_USERINFO, "rotatedSecret1").replace(KEY_IN_QUERY, "rotatedSecret2")
        again = make_planner("openai", model="m", base_url=rotated, cache_dir=tmp_path)
        assert again.plan("a dog runs").cached  # the same server with another key keeps its plans
        assert len(list(tmp_path.glob("*.json"))) == 2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("text, secrets", [
    ("https://user:hunter2pass@example.com/v1", ()),
    ("https://example.com/v1?api_key=hunter2pass&x=1", ()),
    ("https://example.com/v1?token=hunter2pass", ()),
    ("https://example.com/v1?access_token=hunter2pass", ()),
    ('{"Authorization": "Bearer hunter2pass"}', ()),
    ("authorization: Basic aHVudGVyMnBhc3M=hunter2pass", ()),
    ("key sk-hunter2passhunter2pass in a body", ()),
    ("echo: hunter2pass", ("hunter2pass",)),
])
def test_redact_masks_every_form_of_credential(text, secrets):
    assert "hunter2pass" not in redact(text, secrets)


def test_secrets_of_url_finds_userinfo_and_query_credentials():
    found = secrets_of_url("https://u:p%40ss@h.example/v1?api_key=abc123&model=m")
    assert "p@ss" in found and "abc123" in found and "m" not in found
