"""A tiny byte-level BPE tokenizer with the DeepSeek special tokens, for test fixtures.

It is trained locally (no network) on the built-in text below, deterministically, and cached in
process: every fixture directory gets byte-identical ``tokenizer.json`` files.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from dsedge import chat_templates

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# The R1 chat template also emits these; the real tokenizer holds each as one added token.
TOOL_TOKENS = (
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)
# Added after the BPE vocabulary (as in the real tokenizer, where they sit at the end), not
# "special": decoding with skip_special_tokens keeps them, like DeepSeek's own tokenizer.json.
CHAT_TOKENS = (USER_TOKEN, ASSISTANT_TOKEN, THINK_OPEN, THINK_CLOSE, *TOOL_TOKENS)

BOS_ID = 0  # trainer special tokens come first, in order: same ids as DeepSeek-V3/R1 (bos 0, eos 1)
EOS_ID = 1
BPE_VOCAB_SIZE = 384  # bos/eos + 256 byte symbols + merges
VOCAB_SIZE = BPE_VOCAB_SIZE + len(CHAT_TOKENS)  # 397: deliberately not a power of two

# The DeepSeek-R1 template of 2025-01-22 (generation prompt without "<think>\\n"); sources in dsedge.chat_templates.
DEEPSEEK_R1_CHAT_TEMPLATE = chat_templates.DEEPSEEK_R1_2501

# The template each tiny variant's tokenizer_config.json carries, as its published family does: V2(-Lite)-Chat's
# "User:/Assistant:", R1's (January text: the runtime must force "<think>\\n" itself) for the V3/R1
# architecture, and the R1-Distill template (updated: its prompt opens "<think>\\n") for Qwen2/Llama.
VARIANT_CHAT_TEMPLATES = {
    "v2_lite": chat_templates.DEEPSEEK_V2,
    "v2": chat_templates.DEEPSEEK_V2,
    "v3": DEEPSEEK_R1_CHAT_TEMPLATE,
    "qwen2": chat_templates.R1_DISTILL,
    "llama": chat_templates.R1_DISTILL,
}

# Training text: a few KB of plain English and Python, enough for a few hundred merges that make
# ordinary test prompts encode to short, multi-byte tokens.
TRAINING_TEXT = '''\
The quick brown fox jumps over the lazy dog. A small model is easy to test, and a test that runs
in a second is a test that people run. We compress the weights, export the graph, and check that
the answers are the same as before. When the answer changes, the test fails and tells us where.
Mixture of experts models route every token to a few experts. The router scores each expert, keeps
the best groups, and picks the top experts inside them. Shared experts see every token. Attention
with a latent cache stores a compressed key and value for each token, which saves a lot of memory
on long prompts. Rotary position embeddings rotate pairs of channels by an angle that grows with
the position of the token in the sequence.
The user asks a question, and the assistant thinks before it answers. It reads the documents that
the retriever found, quotes the sources, and says when it does not know. Please be brief, be
correct, and show your work. What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has eight legs. Write a function that adds two numbers.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 128 256 512 1000 1024 2048 4096 65536 3.14159 2.71828

def add(a: int, b: int) -> int:
    """Return the sum of two integers."""
    return a + b


def mean(values: list[float]) -> float:
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.count = start

    def step(self, by: int = 1) -> int:
        self.count += by
        return self.count


for index, name in enumerate(["alpha", "beta", "gamma", "delta"]):
    print(f"{index}: {name}")

import json
from pathlib import Path

def load_config(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)

config = load_config(Path("config.json"))
hidden_size = config["hidden_size"]
num_layers = config.get("num_hidden_layers", 1)
weights = {name: tensor for name, tensor in state_dict.items() if name.startswith("model.layers")}
assert len(weights) > 0, "no weights found"
if hidden_size % 2 == 0 and num_layers >= 1:
    print("ok")
else:
    print("unexpected shape")

while True:
    line = input("> ")
    if line.strip() in ("quit", "exit"):
        break
    print(line.upper())

# The model reads tokens and writes tokens. The tokenizer turns text into tokens and back again.
# Special tokens mark the start of a sentence, the end of a sentence, and who is speaking.
Once upon a time there was a little robot who wanted to learn to read. Every morning it opened a
book, looked at the letters, and tried to guess the words. At first it made many mistakes, but it
kept trying, and one day it read a whole page without any help. The other robots were very proud.
Water boils at one hundred degrees at sea level. The sun rises in the east and sets in the west.
Good tests are small, fast, and clear. Good names say what a thing holds. Good comments say why.
'''


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The trained tokenizer serialized as ``tokenizer.json`` text (trained once per process)."""
    tokenizer = train_deepseek_bpe(TRAINING_TEXT.splitlines(keepends=True), BPE_VOCAB_SIZE)
    _check_trained(tokenizer)
    return tokenizer.to_str(pretty=True)


def train_deepseek_bpe(texts: Iterable[str], bpe_vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` laid out like DeepSeek's, trained on ``texts``.

    bos/eos get ids 0/1, then the 256 byte symbols and the merges up to ``bpe_vocab_size``; the chat
    tokens (``CHAT_TOKENS``) follow as added, non-special tokens; encoding prepends bos. Training is
    deterministic for a given ``texts`` order. Shared by the test fixtures and the demo models.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unk token
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(text, normalized=False, special=False) for text in CHAT_TOKENS])
    # DeepSeek tokenizers prepend bos (add_bos_token: true) and append nothing.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    return tokenizer


def _check_trained(tokenizer) -> None:
    # A tokenizers release that trains differently must fail here, not as a shape mismatch later.
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    if tokenizer.token_to_id(BOS_TOKEN) != BOS_ID or tokenizer.token_to_id(EOS_TOKEN) != EOS_ID:
        raise RuntimeError("tiny tokenizer: bos/eos did not get ids 0/1")


def tokenizer_config(chat_template: str | None = None, *, model_max_length: int = 16384) -> dict:
    """``tokenizer_config.json`` laid out like DeepSeek-R1's, with a class transformers 5 loads cleanly.

    R1 says ``LlamaTokenizerFast``; transformers 5 then warns that the tokenizer.json is ByteLevel and
    falls back to its generic backend, so we name the generic class directly.
    """
    special = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False,
               "single_word": False}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {**special, "content": BOS_TOKEN},
        "clean_up_tokenization_spaces": False,
        "eos_token": {**special, "content": EOS_TOKEN},
        "legacy": True,
        "model_max_length": model_max_length,
        "pad_token": {**special, "content": EOS_TOKEN},
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": DEEPSEEK_R1_CHAT_TEMPLATE if chat_template is None else chat_template,
    }


def write_tokenizer(out_dir, *, chat_template: str | None = None) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir`` (created if missing).

    ``chat_template`` defaults to the DeepSeek-R1 template.
    """
    write_tokenizer_files(out_dir, tokenizer_json(), chat_template=chat_template)


def write_tokenizer_files(out_dir, tokenizer_json_text: str, *, chat_template: str | None = None,
                          model_max_length: int = 16384) -> None:
    """Write a given ``tokenizer.json`` text plus a DeepSeek-R1-style ``tokenizer_config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json_text, encoding="utf-8")
    config = tokenizer_config(chat_template, model_max_length=model_max_length)
    config_text = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    (out / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
