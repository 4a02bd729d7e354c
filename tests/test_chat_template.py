"""The opt-in chat template for prompt/response pairs (``examples_from_pairs(..., chat_template=True)``,
``records_to_examples(..., chat_template=True)``, CLI ``--chat-template``): the prompt turn is masked, the
reply and the template's end of turn are the labels; refusals for a tokenizer without a template and for
a template whose prompt is not a prefix of the conversation."""
import os

import pytest

from lora_da_fast.cli.builtins import byte_level_tokenizer, cache_dir, records_to_examples
from lora_da_fast.cli.args import build_parser
from lora_da_fast.data import IGNORE_INDEX
from lora_da_fast.errors import ConfigError, DataError
from lora_da_fast.text import examples_from_pairs

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(template=TEMPLATE):
    tok = byte_level_tokenizer()
    tok.chat_template = template
    return tok


def test_prompt_turn_masked_reply_and_end_of_turn_labelled():
    tok = _tokenizer()
    ex = examples_from_pairs(tok, ["What is 2+2?"], ["4"], max_length=200, chat_template=True)[0]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = [tok.bos_token_id] + ids("<|user|>What is 2+2?<|end|>\n<|assistant|>")
    reply = ids("4<|end|>\n")
    assert ex["input_ids"].tolist() == prompt + reply  # no extra eos: the template closes the turn
    assert ex["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + reply
    # truncated from the right like the plain layout
    short = examples_from_pairs(tok, ["What is 2+2?"], ["4"], max_length=len(prompt) + 2, chat_template=True)[0]
    assert short["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + reply[:2]
    # off by default: the plain layout, prompt + reply + eos
    plain = examples_from_pairs(tok, ["What is 2+2?"], ["4"], max_length=200)[0]
    assert plain["input_ids"].tolist() == [tok.bos_token_id] + ids("What is 2+2?") + ids("4") + [tok.eos_token_id]


def test_records_and_refusals():
    tok = _tokenizer()
    records = [{"text": "plain text"}, {"prompt": "hi", "response": "there"}]
    out = records_to_examples(tok, records, 200, chat_template=True)
    assert out[0]["labels"].tolist() == out[0]["input_ids"].tolist()  # text records unchanged
    assert out[1]["labels"].tolist()[0] == IGNORE_INDEX and out[1]["labels"].tolist()[-1] != IGNORE_INDEX
    with pytest.raises(ConfigError, match="no chat template"):
        records_to_examples(byte_level_tokenizer(), records, 200, chat_template=True)
    with pytest.raises(ConfigError, match="no chat template"):
        examples_from_pairs(byte_level_tokenizer(), ["a"], ["b"], 20, chat_template=True)
    odd = _tokenizer("{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}>>{% endif %}")
    with pytest.raises(DataError, match="not .*a prefix"):
        examples_from_pairs(odd, ["a"], ["b"], 20, chat_template=True)


def test_cli_flag():
    base = ["init", "--model", "m", "--data", "d.jsonl", "--out", "o"]
    assert build_parser().parse_args(base + ["--chat-template"]).chat_template is True
    assert build_parser().parse_args(base).chat_template is False


def test_smollm2_tokenizer_if_present():
    folder = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if not os.path.isdir(folder):
        pytest.skip("SmolLM2 is not built (lora-da-fast init --model smollm2-135m builds it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ex = examples_from_pairs(tok, ["What is 2+2?"], ["4"], max_length=200, chat_template=True)[0]
    labelled = [i for i, lab in zip(ex["input_ids"].tolist(), ex["labels"].tolist()) if lab != IGNORE_INDEX]
    assert tok.decode(labelled) == "4<|im_end|>\n"
    assert "<|im_start|>assistant\n" in tok.decode(ex["input_ids"][: len(ex["input_ids"]) - len(labelled)])
