"""The openai planner backend against a real HTTP server on 127.0.0.1, and the plan cache."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from socketserver import ThreadingTCPServer

import pytest

from fvg.plan import (
    SYSTEM_PROMPT, TEMPLATE_VERSION, OpenAIPlanner, Plan, PlanCache, RulesPlanner, cache_key, make_planner,
    parse_reply,
)

PROMPT = "a dog runs to the left"
ANSWER = {"first_frame_caption": "a dog standing on the right side of a park",
          "upsampled_prompt": "a dog runs from the right side of a sunny park to the left"}


def completion(content: str) -> tuple[int, str]:
    return 200, json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


VALID = completion("Here you go:\n```json\n" + json.dumps(ANSWER) + "\n```")


class FakeServer:
    """An OpenAI-style /chat/completions endpoint answering from a script of (status, body)."""

    def __init__(self):
        self.script: list[tuple[int, str]] = []
        self.default = VALID
        self.delay = 0.0
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(server.delay)
                status, text = server.script.pop(0) if server.script else server.default
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        # ThreadingTCPServer, not ThreadingHTTPServer: that one resolves the host name (slow offline)
        self.httpd = ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def planner_for(server, tmp_path, **kw) -> OpenAIPlanner:
    kw.setdefault("use_cache", False)
    return make_planner("openai", model="tiny-planner", base_url=server.url, cache_dir=tmp_path / "cache",
                        backoff=0.01, **kw)


# ---------------------------------------------------------------- requests and replies


def test_valid_reply_becomes_the_plan(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FVG_TEST_PLANNER_KEY", "sk-test-123")
    planner = planner_for(server, tmp_path, api_key_env="FVG_TEST_PLANNER_KEY")
    plan = planner.plan(PROMPT)
    assert plan == Plan(PROMPT, ANSWER["first_frame_caption"], ANSWER["upsampled_prompt"], "openai",
                        "tiny-planner", TEMPLATE_VERSION)
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-123"
    body = request["body"]
    assert body["model"] == "tiny-planner" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert body["messages"][-1] == {"role": "user", "content": f"Video prompt: {PROMPT}"}
    roles = [m["role"] for m in body["messages"]]
    assert roles[1:-1] == ["user", "assistant"] * ((len(roles) - 2) // 2) and len(roles) >= 8
    for shot in body["messages"][2:-1:2]:  # the few-shot answers are valid replies themselves
        parse_reply(shot["content"])


def test_no_key_sends_no_authorization(server, tmp_path, monkeypatch):
    monkeypatch.delenv("FVG_TEST_PLANNER_KEY", raising=False)
    planner_for(server, tmp_path, api_key_env="FVG_TEST_PLANNER_KEY").plan(PROMPT)
    assert "Authorization" not in server.requests[0]["headers"]


def test_server_errors_and_invalid_json_are_retried(server, tmp_path):
    server.script = [
        (500, "overloaded"),
        (200, "this is not json"),
        completion("Sure! The first frame shows a dog."),  # the model ignored the format
        completion(json.dumps({"first_frame_caption": "", "upsampled_prompt": "x"})),
    ]
    plan = planner_for(server, tmp_path, max_retries=4).plan(PROMPT)
    assert plan.backend == "openai" and plan.warnings == []
    assert plan.first_frame_caption == ANSWER["first_frame_caption"]
    assert len(server.requests) == 5
    last_user = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert last_user[0] == last_user[1] == last_user[2] == f"Video prompt: {PROMPT}"
    assert "no JSON object" in last_user[3]  # the reminder says what was wrong
    assert "first_frame_caption" in last_user[4] and "could not be used" in last_user[4]


def test_exhausted_retries_fall_back_to_rules(server, tmp_path):
    server.default = (503, "down for maintenance")
    plan = planner_for(server, tmp_path, max_retries=2, use_cache=True).plan(PROMPT)
    expected = RulesPlanner().plan(PROMPT)
    assert (plan.first_frame_caption, plan.backend, plan.model) == (expected.first_frame_caption, "rules", None)
    assert len(server.requests) == 3
    (warning,) = plan.warnings
    assert warning.startswith("openai: tiny-planner: no valid plan after 3 attempt(s)")
    assert "HTTP 503" in warning and "fell back to rules" in warning
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # not cached


def test_client_errors_are_not_retried(server, tmp_path):
    server.default = (401, '{"error": "invalid api key"}')
    plan = planner_for(server, tmp_path, max_retries=3).plan(PROMPT)
    assert len(server.requests) == 1
    assert plan.backend == "rules" and "HTTP 401" in plan.warnings[0]


def test_server_down_falls_back_quickly(tmp_path, free_port):
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    planner = make_planner("openai", model="m", base_url=closed, max_retries=2, timeout=2.0,
                           use_cache=False, backoff=0.01)
    start = time.monotonic()
    plan = planner.plan(PROMPT)
    assert time.monotonic() - start < 5.0
    assert plan.backend == "rules" and plan.first_frame_caption == RulesPlanner().plan(PROMPT).first_frame_caption
    assert "cannot reach" in plan.warnings[0] and "after 3 attempt(s)" in plan.warnings[0]


def test_timeout_is_retried_then_falls_back(server, tmp_path):
    server.delay = 1.0
    plan = planner_for(server, tmp_path, max_retries=1, timeout=0.2).plan(PROMPT)
    assert plan.backend == "rules" and "timeout" in plan.warnings[0]
    assert len(server.requests) == 2


# ---------------------------------------------------------------- cache


def test_cache_hit_skips_the_server(server, tmp_path):
    planner = planner_for(server, tmp_path, use_cache=True)
    first = planner.plan(PROMPT)
    assert not first.cached and len(server.requests) == 1
    files = list((tmp_path / "cache").glob("*.json"))
    assert len(files) == 1 and files[0].stem == cache_key("openai", "tiny-planner", TEMPLATE_VERSION, PROMPT,
                                                        planner.endpoint)

    second = planner.plan(PROMPT)
    assert second.cached and len(server.requests) == 1
    assert Plan.from_dict({**second.to_dict(), "cached": False}) == first
    third = planner_for(server, tmp_path, use_cache=True).plan(f"  {PROMPT}\n")  # a new planner, same cache
    assert third.cached and len(server.requests) == 1


def test_cache_misses_when_model_template_or_prompt_change(server, tmp_path, monkeypatch):
    planner_for(server, tmp_path, use_cache=True).plan(PROMPT)
    make_planner("openai", model="other-model", base_url=server.url, cache_dir=tmp_path / "cache").plan(PROMPT)
    assert len(server.requests) == 2
    planner_for(server, tmp_path, use_cache=True).plan(PROMPT + " quickly")
    assert len(server.requests) == 3
    monkeypatch.setattr("fvg.plan.llm.TEMPLATE_VERSION", "fvg-plan-v2")
    plan = planner_for(server, tmp_path, use_cache=True).plan(PROMPT)
    assert len(server.requests) == 4 and plan.template_version == "fvg-plan-v2" and not plan.cached


def test_cache_key_covers_every_field():
    base = ("openai", "m", TEMPLATE_VERSION, "p")
    keys = {cache_key(*base)}
    for i, other in enumerate(["transformers", "m2", "fvg-plan-v0", "p2"]):
        keys.add(cache_key(*(base[:i] + (other,) + base[i + 1 :])))
    assert len(keys) == 5
    assert cache_key(*base) == cache_key(*base) and len(cache_key(*base)) == 64


def test_unreadable_cache_entries_are_misses(tmp_path):
    cache = PlanCache(tmp_path)
    plan = Plan(PROMPT, "c", "u", "openai", "m", TEMPLATE_VERSION)
    cache.put(plan)
    hit = cache.get("openai", "m", TEMPLATE_VERSION, PROMPT)
    assert hit is not None and hit.cached and hit.first_frame_caption == "c"
    cache.path(cache_key("openai", "m", TEMPLATE_VERSION, PROMPT)).write_text("{not json")
    assert cache.get("openai", "m", TEMPLATE_VERSION, PROMPT) is None
    assert [p.name for p in tmp_path.iterdir()] == [f"{cache_key('openai', 'm', TEMPLATE_VERSION, PROMPT)}.json"]


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    from fvg.plan import default_cache_dir

    monkeypatch.setenv("FVG_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "plans"
    monkeypatch.delenv("FVG_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fvg" / "plans"


# ---------------------------------------------------------------- reply parsing


def test_parse_reply_takes_the_first_json_object():
    reply = '<think>{"draft": 1}</think> Sure: {"first_frame_caption": " a  cat\\n", "upsampled_prompt": "u"} {"x": 1}'
    assert parse_reply(reply) == ("a cat", "u")
    assert parse_reply('noise { not json } {"first_frame_caption": "c", "upsampled_prompt": "u"}') == ("c", "u")
    for bad in ["", "plain text", '{"first_frame_caption": "c"}', '{"first_frame_caption": 3, "upsampled_prompt": "u"}',
                '["first_frame_caption"]', json.dumps({"first_frame_caption": "c" * 5000, "upsampled_prompt": "u"})]:
        with pytest.raises(ValueError):
            parse_reply(bad)
