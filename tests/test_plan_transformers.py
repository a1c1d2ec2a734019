"""The transformers planner backend, with a real tiny Qwen2 model and tokenizer built offline.

The tokenizer is a byte-level BPE with Qwen2's pre-tokenizer, trained in memory on the
planner's own chat and given a Qwen-style chat template; transformers loads it back as a
Qwen2Tokenizer, as it would a real Qwen checkpoint. A randomly initialised model shows
retries and the fallback to the rules; the same model overfitted on one chat shows the
valid path end to end. Torch runs single-threaded here: on a shared 2-core machine that is
several times faster than two contending threads.
"""

import json
import shutil

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from fvg.io import FvgError
from fvg.plan import SYSTEM_PROMPT, TEMPLATE_VERSION, RulesPlanner, TransformersPlanner, build_messages, make_planner
from fvg.plan.llm import REMINDER

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PROMPT = "a paper boat drifts to the right"
ANSWER = {"first_frame_caption": "a paper boat on the left of a pond", "upsampled_prompt": "a paper boat drifts right"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in build_messages(PROMPT)] + [REMINDER, json.dumps(ANSWER)]
    trainer = trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(tok) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def overfit(model, tok, max_steps: int = 300) -> None:
    """Train until greedy decoding of the planner's chat for PROMPT yields ANSWER."""
    prefix = tok.apply_chat_template(build_messages(PROMPT), tokenize=False, add_generation_prompt=True)
    target = json.dumps(ANSWER)
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    ids = tok(prefix + target + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[: len(prefix_ids)] == prefix_ids
    ids, n = torch.tensor([ids]), len(prefix_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(1, max_steps + 1):
        hidden = model.model(input_ids=ids).last_hidden_state[0, n - 1 : -1]  # positions predicting the answer
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), ids[0, n:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 and loss.item() < 0.1:
            model.eval()
            out = model.generate(torch.tensor([prefix_ids]), max_new_tokens=64, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            if tok.decode(out[0, len(prefix_ids):], skip_special_tokens=True) == target:
                return
            model.train()
    raise AssertionError("the tiny model did not learn the answer")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, single_thread):
    tok = build_tokenizer()
    model = build_model(tok)
    random_dir = tmp_path_factory.mktemp("random-planner")
    tok.save_pretrained(random_dir)
    model.save_pretrained(random_dir)
    tok = AutoTokenizer.from_pretrained(random_dir)  # what the backend will load
    overfit(model, tok)
    trained_dir = tmp_path_factory.mktemp("trained-planner")
    tok.save_pretrained(trained_dir)
    model.save_pretrained(trained_dir)
    return random_dir, trained_dir


def test_valid_reply_becomes_the_plan_and_is_cached(tiny_models, tmp_path):
    _, trained = tiny_models
    planner = make_planner("transformers", model=str(trained), cache_dir=tmp_path, max_new_tokens=64)
    assert isinstance(planner, TransformersPlanner)
    plan = planner.plan(PROMPT)
    assert plan.first_frame_caption == ANSWER["first_frame_caption"]
    assert plan.upsampled_prompt == ANSWER["upsampled_prompt"]
    assert (plan.backend, plan.model, plan.template_version, plan.warnings, plan.cached) == (
        "transformers", str(trained), TEMPLATE_VERSION, [], False)

    again = make_planner("transformers", model=str(trained), cache_dir=tmp_path)
    hit = again.plan(PROMPT)
    assert hit.cached and hit.first_frame_caption == plan.first_frame_caption
    assert again._model is None  # answered from the cache without loading the model


def test_invalid_replies_are_retried_then_fall_back_to_rules(tiny_models, tmp_path):
    random_dir, _ = tiny_models
    planner = make_planner("transformers", model=str(random_dir), max_retries=2, cache_dir=tmp_path,
                           max_new_tokens=16)
    calls = []
    complete = planner._complete
    planner._complete = lambda messages, attempt: calls.append((messages, attempt)) or complete(messages, attempt)

    plan = planner.plan(PROMPT)
    expected = RulesPlanner().plan(PROMPT)
    assert plan.first_frame_caption == expected.first_frame_caption
    assert plan.upsampled_prompt == expected.upsampled_prompt
    assert (plan.backend, plan.model) == ("rules", None)
    assert len(plan.warnings) == 1
    warning = plan.warnings[0]
    assert warning.startswith(f"transformers: {random_dir}: no valid plan after 3 attempt(s)")
    assert "fell back to rules" in warning and "invalid reply" in warning
    assert [attempt for _, attempt in calls] == [0, 1, 2]
    assert "could not be used" not in calls[0][0][-1]["content"]
    assert all("could not be used" in messages[-1]["content"] for messages, _ in calls[1:])
    assert not list(tmp_path.iterdir())  # fallbacks are not cached


def test_retries_sample_reproducibly(tiny_models):
    random_dir, _ = tiny_models
    planner = TransformersPlanner(str(random_dir), max_new_tokens=8)
    messages = build_messages(PROMPT)
    state = torch.random.get_rng_state()
    assert planner._complete(messages, 1) == planner._complete(messages, 1)
    assert planner._complete(messages, 0) == planner._complete(messages, 0)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def test_chat_templates_without_a_system_role_get_it_in_the_first_user_turn(tiny_models, tmp_path):
    random_dir, _ = tiny_models
    shutil.copytree(random_dir, tmp_path, dirs_exist_ok=True)
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    (tmp_path / "chat_template.jinja").write_text(no_system + CHAT_TEMPLATE)
    planner = TransformersPlanner(str(tmp_path), max_new_tokens=4)
    planner.load()
    rendered = []
    render = planner._tokenizer.apply_chat_template
    planner._tokenizer.apply_chat_template = lambda *a, **k: rendered.append(render(*a, **k)) or rendered[-1]
    assert isinstance(planner._complete(build_messages(PROMPT), 0), str)
    assert rendered[-1].startswith(f"<|im_start|>user\n{SYSTEM_PROMPT}\n\nVideo prompt: ")


def test_unloadable_model_says_how_to_get_it(tmp_path, monkeypatch):
    planner = make_planner("transformers", model=str(tmp_path), use_cache=False)
    with pytest.raises(FvgError, match="cannot load") as err:
        planner.plan("a dog runs")  # a local folder that holds no model
    assert str(tmp_path) in str(err.value)

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    planner = make_planner("transformers", model="no-such-org/no-such-llm", use_cache=False)
    with pytest.raises(FvgError, match="not available offline.*hf download no-such-org/no-such-llm"):
        planner.plan("a dog runs")


def test_bad_dtype_is_rejected():
    with pytest.raises(FvgError, match="dtype"):
        make_planner("transformers", dtype="float8")
