"""Tokenizer conformance: Meta's tiktoken tokenizer and the HF fast tokenizer converted from the same file.

Generation parity is only meaningful if both references read the same ids, so this module holds transformers'
own tiktoken conversion (`TikTokenConverter`, through reference/tokenizer.py) to Meta's `Tokenizer` id for id:
on a fixed multilingual corpus, on every vocab token's text, on hypothesis-generated text, on special tokens
written as text, on BOS/EOS, and on inputs long enough for Meta's encoder to cut them. The one genuine
difference (Meta's 400k-character / 25k-run cuts) is pinned, not hidden. Every comparison of HF's ids with Meta's
leaves one parity record of component 'tokenizer' (parity.check.record_token_ids: the case, ids compared, ids
differing, first differing position), so the JSON and the report show the tokenizer beside the numerics.

Speed: the converted tokenizer is built once per process (and cached on disk across runs); the vocab-wide tests
share one parse of the tiktoken file; hypothesis runs at most 100 examples per test whatever the profile.

Fixture names avoid `mesh`, `dtype` and `reference`, which conftest parametrizes.
"""
from __future__ import annotations

import itertools
import json
import os
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.strategies import run_case
from llama_spec import tokenizer as spec_tok
from llama_spec.files import cache_root
from parity.check import record_token_ids
from reference import tokenizer as rt
from reference import tokenizer_cache as tok_cache

# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_tok():
    return spec_tok.meta_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    return rt.hf_tokenizer()


@pytest.fixture(scope="module")
def ranks():
    """The packaged file's `{token bytes: rank}`, parsed once for the vocab-wide tests."""
    return spec_tok.read_tiktoken_ranks(spec_tok.PACKAGED_TOKENIZER_PATH)


def _show(tokenizer_decode, ids, at):
    window = ids[max(0, at - 3):at + 4]
    return f"{window} = {[tokenizer_decode([i]) for i in window]!r}"


def assert_same_ids(request, case, text, meta_ids, hf_ids, meta_tok, what="encode"):
    """Record the comparison as case `case`; fail with the first diverging position, the ids around it on each side,
    and what they decode to."""
    __tracebackhide__ = True
    record = record_token_ids(request, name=case, actual=[hf_ids], expected=[meta_ids], reference="meta")
    if record["passed"]:
        return
    at = int(record["metrics"]["first_difference"])
    shown = text if len(text) <= 120 else text[:117] + "..."
    pytest.fail(
        f"{what}: Meta and HF ids differ for {shown!r} ({len(text)} chars)\n"
        f"  lengths: Meta {len(meta_ids)}, HF {len(hf_ids)}; first difference at position {at}\n"
        f"  Meta: {_show(meta_tok.decode, meta_ids, at)}\n"
        f"  HF:   {_show(meta_tok.decode, hf_ids, at)}",
        pytrace=False,
    )


def meta_ids(meta_tok, text, **kwargs):
    kwargs.setdefault("bos", False)
    kwargs.setdefault("eos", False)
    return meta_tok.encode(text, **kwargs)


def hf_ids(text, **kwargs):
    kwargs.setdefault("bos", False)
    kwargs.setdefault("eos", False)
    return rt.hf_encode(text, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# the fixed corpus: each entry names what it is there to exercise
# ---------------------------------------------------------------------------------------------------------------

PYTHON_SOURCE = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out


class Cache(dict):
\tdef __missing__(self, key):  # tab-indented on purpose
\t\tvalue = self[key] = key ** 2
\t\treturn value

if __name__ == "__main__":
    print(fibonacci(10), {k: v for k, v in Cache().items()})  \n'''

CORPUS = {
    "empty": "",
    "english": "The quick brown fox jumps over the lazy dog. It's what we'd've done; they'll say I'm right.",
    "english_contractions_upper": "IT'S, YOU'RE, WE'VE, I'M, HE'LL, SHE'D, DON'T -- Won't 'S 'T 'Tis O'REILLY'S 'LLAMA"
                                  " IT'SON THEY'REAM I'Mane",  # contraction rule is case-insensitive
    "python_code": PYTHON_SOURCE,
    "json_and_markup": '{"key": [1, 2.5e-3, null], "html": "<a href=\\"x\\">&amp;</a>"}\n<div class="c">x</div>',
    "emoji": "Good job! 👍🏽 🎉🎉🎉 I ❤️ it 🔥💯",
    "emoji_zwj_sequences": "family 👨‍👩‍👧‍👦, rainbow flag 🏳️‍🌈, astronaut 🧑🏿‍🚀, flags 🇯🇵🇫🇷🇺🇸, keycap 1️⃣",
    "chinese": "我们今天去公园散步，天气非常好。机器学习是人工智能的一个分支。",
    "japanese": "東京は日本の首都です。ひらがなとカタカナ、そして漢字を混ぜて書きます。ｶﾀｶﾅ（半角）",
    "korean": "안녕하세요. 한국어 형태소 분석은 어렵습니다! 띄어쓰기  두 칸.",
    "arabic": "مرحبا بالعالم! هذه جملة عربية مع أرقام ١٢٣٤٥ و 67890.",
    "hebrew": "שלום עולם, זהו משפט בעברית עם ניקוד: בְּרֵאשִׁית.",
    "bidi_mixed": "English עברית العربية English 123 ٤٥٦",
    "devanagari": "नमस्ते दुनिया। हिन्दी में संयुक्ताक्षर: क्ष त्र ज्ञ श्र, और अंक १२३४५।",
    # words that are single late-rank tokens BPE merges alone cannot reach (tiktoken returns them whole)
    "vietnamese": "Việt Nam: nhiều việc hợp tác, điều ngoài ý muốn, tất nhiên.",
    "turkish_czech_persian": "Bu önemli ektedir. Známe jeho dům. ایران و تهران",
    "thai_no_spaces": "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "cyrillic_greek": "Съешь же ещё этих мягких французских булок. Ελληνικά: αβγ ΑΒΓ ς.",
    "latin_diacritics_nfc_nfd": "café naïve façade Ångström — and decomposed: "
                                "cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "whitespace_runs": "a  b   c    d\t\te\t \tf\n\ng\n\n\n\nh",
    "crlf_and_cr": "line one\r\nline two\r\n\r\nline four\rold mac\r\n",
    "trailing_spaces": "trailing spaces   \nand tabs\t\t\nand at the end   ",
    "leading_whitespace": "   \t\n  indented start",
    "only_whitespace": " \t \n\r\n  \u00a0\u3000 ",
    "unicode_spaces": "no\u00a0break\u2002en\u2003em\u2009thin\u200bzero\u3000ideographic\u2028line\u2029para",
    "digit_runs": "1 12 123 1234 12345 123456 1234567 3.14159265358979 0x7fff 1,000,000 2024-06-30 007",
    "digits_other_scripts": "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ ０１２３４ ①②③ ½ ²³ Ⅻ",
    "punctuation_runs": "Wait... what?!?! ---> <=> :: ;; \"quoted\" 'single' «guillemets» „low“ (((nested)))",
    "special_tokens_as_text": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                              "<|reserved_special_token_17|><|python_tag|><|image|>",
    "almost_special_tokens": "<|begin_of_text| <|eot_id |<|> <||> <|unknown_special|> |>",
    "control_chars": "nul\x00bell\x07esc\x1b[0mdel\x7f\u200e\u200f\ufeffbom",
    "astral_plane": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐁𝐨𝐥𝐝 𓀀𓀁 𠀀𠀁 \U000f0000 \U0010fffd",
    "replacement_and_noncharacters": "\ufffd\ufffe\uffff\U0001fffe",
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_ids_match_meta(request, name, meta_tok, hf_tok):
    text = CORPUS[name]
    assert_same_ids(request, name, text, meta_ids(meta_tok, text), hf_ids(text), meta_tok)


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_round_trips(name, meta_tok, hf_tok):
    text = CORPUS[name]
    ids = meta_ids(meta_tok, text)
    assert meta_tok.decode(ids) == text, "Meta: decode(encode(x)) != x"
    assert rt.hf_decode(rt.hf_encode(text, bos=False, eos=False)) == text, "HF: decode(encode(x)) != x"


def test_whole_corpus_with_bos_eos(request, meta_tok, hf_tok):
    text = "\n\n".join(CORPUS.values())
    assert_same_ids(request, "whole corpus, bos, eos", text, meta_ids(meta_tok, text, bos=True, eos=True),
                    hf_ids(text, bos=True, eos=True), meta_tok)


def test_digit_runs_split_into_groups_of_at_most_three(request, meta_tok, hf_tok):
    """Llama 3's split regex cuts numbers into 1-3 digit pieces, left to right, on both sides."""
    for text, pieces in [("1234567", ["123", "456", "7"]), ("12345", ["123", "45"]),
                         ("x 2024!", ["x", " ", "202", "4", "!"]), ("١٢٣٤", None)]:
        meta = meta_ids(meta_tok, text)
        hf = hf_ids(text)
        assert_same_ids(request, f"digits {text!r}", text, meta, hf, meta_tok)
        decoded = [meta_tok.decode([i]) for i in hf]
        if pieces is not None:
            assert decoded == pieces, f"{text!r} -> {decoded}, expected {pieces}"
        assert all(sum(c.isdigit() for c in piece) <= 3 for piece in decoded), decoded


# ---------------------------------------------------------------------------------------------------------------
# the HF side is transformers' own conversion
# ---------------------------------------------------------------------------------------------------------------

def test_hf_pipeline_is_transformers_tiktoken_converter(meta_tok, hf_tok):
    """The split regex is TikTokenConverter's default (not passed in) and equals Meta's `pat_str`; the rest of the
    pipeline is what the converter builds, plus HF's BOS template."""
    import inspect

    from transformers.convert_slow_tokenizer import TikTokenConverter

    default = inspect.signature(TikTokenConverter.__init__).parameters["pattern"].default
    assert default == meta_tok.pat_str, "transformers' default tiktoken split regex is no longer Llama 3's"
    backend = hf_tok.backend_tokenizer
    pre = json.loads(backend.pre_tokenizer.__getstate__())
    assert [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]
    assert pre["pretokenizers"][0]["pattern"] == {"Regex": meta_tok.pat_str}
    assert pre["pretokenizers"][0]["behavior"] == "Isolated"
    assert (pre["pretokenizers"][1]["add_prefix_space"], pre["pretokenizers"][1]["use_regex"]) == (False, False)
    assert type(backend.model).__name__ == "BPE" and backend.model.ignore_merges and backend.normalizer is None
    assert json.loads(backend.decoder.__getstate__())["type"] == "ByteLevel"
    post = json.loads(backend.post_processor.__getstate__())
    assert post["type"] == "TemplateProcessing" and post["special_tokens"] == {
        "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}}


# ---------------------------------------------------------------------------------------------------------------
# special tokens, BOS and EOS
# ---------------------------------------------------------------------------------------------------------------

# Llama 3 / 3.1 ids as Meta's Tokenizer and model cards define them.
EXPECTED_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|step_id|>": 128005,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|image|>": 128011,
    "<|reserved_special_token_0|>": 128002,
    "<|reserved_special_token_2|>": 128012,
    "<|reserved_special_token_245|>": 128255,
}


def test_meta_special_token_ids(meta_tok):
    assert len(meta_tok.special_tokens) == 256
    assert meta_tok.n_words == 128256
    for name, token_id in EXPECTED_IDS.items():
        assert meta_tok.special_tokens[name] == token_id, name
    assert (meta_tok.bos_id, meta_tok.eos_id, meta_tok.eot_id, meta_tok.eom_id, meta_tok.pad_id,
            meta_tok.python_tag_id) == (128000, 128001, 128009, 128008, 128004, 128010)
    assert sorted(meta_tok.stop_tokens) == [128001, 128008, 128009]


def test_hf_special_tokens_match_meta(meta_tok, hf_tok):
    added = hf_tok.backend_tokenizer.get_added_tokens_decoder()
    assert {token_id: token.content for token_id, token in added.items()} == \
        {token_id: name for name, token_id in meta_tok.special_tokens.items()}, "HF added tokens vs Meta's specials"
    assert all(token.special and not token.normalized and not token.lstrip and not token.rstrip
               for token in added.values())
    for name, token_id in meta_tok.special_tokens.items():
        assert hf_tok.convert_tokens_to_ids(name) == token_id, name
        assert hf_tok.convert_ids_to_tokens(token_id) == name, token_id
    assert len(hf_tok) == meta_tok.n_words == 128256
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == \
        (meta_tok.bos_id, meta_tok.eos_id, meta_tok.pad_id)


def test_hf_base_vocab_is_meta_ranks(meta_tok, hf_tok, ranks):
    """Every BPE rank has the same id, and every id (special or not) decodes to the same text on both sides."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    assert len(ranks) == 128000
    vocab = hf_tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert vocab == {"".join(table[b] for b in token): rank for token, rank in ranks.items()}
    all_ids = [[i] for i in range(meta_tok.n_words)]
    hf_text = hf_tok.backend_tokenizer.decode_batch(all_ids, skip_special_tokens=False)
    bad = [i for (i,), text in zip(all_ids, hf_text) if meta_tok.decode([i]) != text]
    assert not bad, f"{len(bad)} ids decode differently, first {bad[:5]}"


def _hf_ordinary_ids(hf_tok, texts):
    """HF ids for many texts at once, special-token text as plain text (as Meta's `encode_ordinary`)."""
    hf = hf_tok.backend_tokenizer
    hf.encode_special_tokens = True
    try:
        return [enc.ids for enc in hf.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        hf.encode_special_tokens = hf_tok.split_special_tokens


def _token_texts(ranks):
    texts = []
    for token in ranks:
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def test_every_vocab_token_text_encodes_alike(request, meta_tok, hf_tok, ranks):
    """The text of every BPE token that is valid UTF-8, encoded alone. Both sides return a pre-token that is itself
    a token whole (tiktoken's lookup, HF's `ignore_merges`; several hundred late tokens are reachable only so), so
    this checks the vocab and that shortcut, not the merges (next test)."""
    texts = _token_texts(ranks)
    assert len(texts) > 120_000
    meta, hf = [meta_tok.model.encode_ordinary(text) for text in texts], _hf_ordinary_ids(hf_tok, texts)
    record_token_ids(request, name="every vocab token's text", actual=hf, expected=meta, reference="meta")
    bad = [text for text, a, b in zip(texts, hf, meta) if a != b]
    assert not bad, f"{len(bad)} token texts encode differently, e.g. {bad[:5]!r}"


# Appended to a token's text, these stay in its pre-token (a letter after a letter, punctuation after anything
# else) and almost never merge with it, so the whole pre-token is not a token and BPE must build the token by merges.
_AFTER_LETTER, _AFTER_OTHER = "\U00020000", "\u2e0e"  # CJK ideograph 𠀀 (Lo), editorial coronis ⸎ (Po)


def test_every_vocab_token_is_built_by_merges_alike(request, meta_tok, hf_tok, ranks):
    """Every valid-UTF-8 token not ending in whitespace, followed by a rare character of its pre-token class:
    Meta's result contains the token itself for more than 99% of them, so a merge missing, extra or out of order
    on the HF side shows here (the whole-token test above cannot see merges)."""
    texts = [text + (_AFTER_LETTER if unicodedata.category(text[-1]).startswith("L") else _AFTER_OTHER)
             for text in _token_texts(ranks) if not text[-1].isspace()]
    assert len(texts) > 120_000
    meta = [meta_tok.model.encode_ordinary(text) for text in texts]
    reached = sum(ranks[text[:-1].encode()] in ids for text, ids in zip(texts, meta))
    assert reached > 0.99 * len(texts), f"only {reached} of {len(texts)} tokens are built by merging here"
    hf = _hf_ordinary_ids(hf_tok, texts)
    record_token_ids(request, name="every vocab token's text + one character", actual=hf, expected=meta,
                     reference="meta")
    bad = [text for text, a, b in zip(texts, hf, meta) if a != b]
    assert not bad, f"{len(bad)} token texts + one character encode differently, e.g. {bad[:5]!r}"


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("text", ["", "Hello, world!", "<|begin_of_text|>already there", "  x\n"])
def test_bos_eos_like_meta(request, text, bos, eos, meta_tok, hf_tok):
    meta = meta_ids(meta_tok, text, bos=bos, eos=eos)
    what = f"encode(bos={bos}, eos={eos})"
    assert_same_ids(request, f"{text!r} {what}", text, meta, hf_ids(text, bos=bos, eos=eos), meta_tok, what)
    assert (meta[:1] == [128000]) == bos
    assert (meta[-1:] == [128001]) == eos


def test_hf_adds_bos_through_its_template_and_never_eos(hf_tok):
    """hf_encode's BOS comes from the post-processor template; plain HF calls get the same default."""
    with_template = hf_tok("Hello").input_ids
    without = hf_tok("Hello", add_special_tokens=False).input_ids
    assert with_template == [128000] + without
    assert hf_tok("").input_ids == [128000]
    assert 128001 not in with_template


def test_special_token_text_is_plain_text_by_default(request, meta_tok, hf_tok):
    """Meta's encode defaults to allowed_special=set(), disallowed_special=(): special text is not special."""
    text = CORPUS["special_tokens_as_text"]
    meta = meta_ids(meta_tok, text)
    assert max(meta) < 128000, "Meta's default encodes special-token text as ordinary text"
    assert_same_ids(request, "special_tokens_as_text", text, meta, hf_ids(text), meta_tok)
    # HF's own default differs (it matches added tokens); hf_encode is what follows Meta
    assert 128000 in hf_tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("allowed", ["all", frozenset({"<|eot_id|>", "<|start_header_id|>"}), frozenset()],
                         ids=["all", "subset", "none"])
def test_allowed_special_like_meta(request, allowed, meta_tok, hf_tok):
    text = CORPUS["special_tokens_as_text"] + " tail <|eot_id|><|eot_id|>x"
    meta = meta_ids(meta_tok, text, allowed_special=allowed)
    hf = hf_ids(text, allowed_special=allowed)
    # the record's name is its identity in the baseline: a set's repr follows the process's hash seed, so sorted
    shown = (repr(allowed) if isinstance(allowed, str) else
             "frozenset({" + ", ".join(map(repr, sorted(allowed))) + "})" if allowed else "frozenset()")
    what = f"encode(allowed_special={shown})"
    assert_same_ids(request, what, text, meta, hf, meta_tok, what)
    expected_specials = {meta_tok.special_tokens[name] for name in
                         (meta_tok.special_tokens if allowed == "all" else allowed) if name in text}
    assert {i for i in hf if i >= 128000} == expected_specials


def test_disallowed_special_raises_like_meta(request, meta_tok, hf_tok):
    text = "hello <|eot_id|>"
    with pytest.raises(ValueError):
        meta_tok.encode(text, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="disallowed special token"):
        rt.hf_encode(text, bos=False, eos=False, disallowed_special="all")
    # allowed wins over disallowed="all", as in tiktoken
    allowed = {"<|eot_id|>"}
    options = dict(allowed_special=allowed, disallowed_special="all")
    what = f"encode(allowed_special={allowed!r}, disallowed_special='all')"
    assert_same_ids(request, what, text, meta_ids(meta_tok, text, **options), hf_ids(text, **options), meta_tok,
                    what)


def test_empty_string(request, meta_tok, hf_tok):
    assert_same_ids(request, "empty", "", meta_ids(meta_tok, ""), hf_ids(""), meta_tok)
    assert_same_ids(request, "empty, bos, eos", "", meta_ids(meta_tok, "", bos=True, eos=True),
                    hf_ids("", bos=True, eos=True), meta_tok)
    assert meta_ids(meta_tok, "") == [] and meta_ids(meta_tok, "", bos=True, eos=True) == [128000, 128001]
    assert meta_tok.decode([]) == rt.hf_decode([]) == ""


# ---------------------------------------------------------------------------------------------------------------
# long inputs and Meta's chunking
# ---------------------------------------------------------------------------------------------------------------

def _ordinary_text(n_chars: int) -> str:
    body = "\n\n".join(v for k, v in CORPUS.items() if k not in ("empty", "special_tokens_as_text"))
    return (body * (n_chars // len(body) + 1))[:n_chars]


def test_long_input_ids_match(request, meta_tok, hf_tok):
    """150k characters of the corpus: Meta hands it to tiktoken in one piece (no cut fires) and ids agree."""
    text = _ordinary_text(150_000)
    assert rt.meta_encode_chunks(text) == [text]
    assert_same_ids(request, "150k chars, bos, eos", text, meta_ids(meta_tok, text, bos=True, eos=True),
                    hf_ids(text, bos=True, eos=True), meta_tok)


def test_input_over_400k_chars_cut_between_pretokens_ids_match(request, meta_tok, hf_tok):
    """Meta cuts at 400,000 characters; when the cut falls between pre-tokens ("\\n" | "The") ids still agree."""
    text = _ordinary_text(399_999) + "\n" + "The end of a very long document. " * 1_000
    chunks = rt.meta_encode_chunks(text)
    assert len(chunks) == 2 and len(chunks[0]) == 400_000
    assert_same_ids(request, "400k chars cut between pre-tokens", text, meta_ids(meta_tok, text), hf_ids(text),
                    meta_tok)


# The one disagreement: inputs whose pre-tokens Meta's cuts split. HF encodes the text whole, so ids differ near
# the cut. Both outputs are pinned exactly, as runs of (id, count) in order: 15831 = "777", 22 = "7", 2813 = "77",
# 58040 = 128 spaces, 13137 = 40 spaces, 5351 = 64 spaces, 23136 = 71 spaces, 4672 = 47 spaces, 865 = " x",
# 64 = "a", 264 = " a", 220 = " ". Encoding Meta's chunks one by one (`chunk_like_meta=True`) reproduces Meta.
MISMATCH_INPUTS = {
    # 25,000-run cut: 25,000 % 3 != 0 shifts the digit groups (Meta 10,001 ids, HF 10,000)
    "30k_digits": (lambda: "7" * 30_000,
                   [(15831, 8333), (22, 1), (15831, 1666), (2813, 1)],
                   [(15831, 10000)]),
    # 25,000-run cut splits one whitespace pre-token in two (Meta 237 ids, HF 236)
    "30k_spaces": (lambda: " " * 30_000 + "x",
                   [(58040, 195), (13137, 1), (58040, 38), (5351, 1), (23136, 1), (865, 1)],
                   [(58040, 234), (4672, 1), (865, 1)]),
    # 400,000-character cut leaves "a " | "a"; whole, HF reads "a", " a" (Meta 225,002 ids, HF 225,001)
    "450k_words": (lambda: "a " * 225_000,
                   [(64, 1), (264, 199999), (220, 1), (64, 1), (264, 24999), (220, 1)],
                   [(64, 1), (264, 224999), (220, 1)]),
}


def _runs(ids):
    return [(token_id, len(list(group))) for token_id, group in itertools.groupby(ids)]


@pytest.mark.parametrize("name", list(MISMATCH_INPUTS))
def test_meta_chunking_is_the_only_difference(request, name, meta_tok, hf_tok):
    make_text, meta_runs, hf_runs = MISMATCH_INPUTS[name]
    text = make_text()
    meta = meta_ids(meta_tok, text)
    assert len(rt.meta_encode_chunks(text)) > 1
    what = "encode(chunk_like_meta=True)"
    assert_same_ids(request, f"{name} {what}", text, meta, hf_ids(text, chunk_like_meta=True), meta_tok, what)
    whole = hf_ids(text)
    assert (_runs(meta), _runs(whole)) == (meta_runs, hf_runs), (
        "the pinned Meta-vs-HF difference changed (a change to Meta's chunking or to the HF conversion): update "
        "docs/what-is-checked.md, the 'Meta's chunking' notes in docs/tokenizer.md and this table")
    assert meta_tok.decode(meta) == rt.hf_decode(whole) == text


# ---------------------------------------------------------------------------------------------------------------
# hypothesis
# ---------------------------------------------------------------------------------------------------------------

_HYPOTHESIS = dict(deadline=None, max_examples=min(100, settings.default.max_examples),
                   suppress_health_check=[HealthCheck.too_slow])
if os.environ.get("CI"):
    _HYPOTHESIS["derandomize"] = True
FUZZ = settings(**_HYPOTHESIS)

# pieces that stress the split regex: contractions, digit runs, whitespace kinds, scripts, joiners, specials
_PIECES = ["'s", "'T", "'ll", "'D", "'RE", "'", "s", "t", "ON", "A", " ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0",
           "\u3000", "\u2028", "0", "1", "9", "12", "٣", "७", "a", "Z", "é", "e\u0301", "ß", "日本", "한", "ع", "ש",
           "क्ष", "!", ".", "...", "-", "_", "(", "<|", "|>", "<|eot_id|>", "<|begin_of_text|>", "😀", "👍🏽",
           "\u200d", "👨‍👩‍👧", "🇫🇷", "\ufe0f", "\x00", "\x7f", "\U0010fffd"]

texts = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=200),
    st.lists(st.sampled_from(_PIECES), max_size=60).map("".join),
)


@FUZZ
@given(text=texts)
def test_random_text_ids_match_and_round_trip(request, text):
    """One record per example (those of hypothesis' shrinking attempts dropped, conformance.strategies.run_case)."""
    meta_tok = spec_tok.meta_tokenizer()
    with run_case(request, text=text):
        meta = meta_ids(meta_tok, text)
        assert_same_ids(request, "random text", text, meta, hf_ids(text), meta_tok)
        assert meta_tok.decode(meta) == text
        assert rt.hf_decode(hf_ids(text)) == text


@FUZZ
@given(ids=st.lists(st.one_of(st.integers(0, 128255), st.integers(0, 255), st.integers(128000, 128255)),
                    max_size=24))
def test_random_ids_decode_alike(ids):
    """Arbitrary id sequences, including cut UTF-8 (streamed generation) and specials, decode the same."""
    assert rt.hf_decode(ids) == spec_tok.meta_tokenizer().decode(ids)


# ---------------------------------------------------------------------------------------------------------------
# loading: the file format check and the cache
# ---------------------------------------------------------------------------------------------------------------

def _first_lines(n, _lines=[]):
    if not _lines:
        _lines.extend(spec_tok.PACKAGED_TOKENIZER_PATH.read_text().splitlines()[:1000])
    return _lines[:n]


BAD_FILES = {
    "sentencepiece": (b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02\n\x0b\n\x03<s>\x15\x00\x00\x00\x00\x18\x03"
                      b"\n\x0c\n\x04\xe2\x96\x81t\x15\x00\x00\x80\xbf", "SentencePiece"),
    "hf_tokenizer_json": (json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}).encode(), "JSON"),
    "git_lfs_pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2183982\n", "LFS"),
    "empty": (b"", "empty"),
    "not_base64": (("\n".join(_first_lines(300)) + "\nnot*base64! 300\n").encode(), "line 301.*not base64"),
    "three_fields": (("\n".join(_first_lines(300)) + "\nIQ== 300 extra\n").encode(), "line 301 has 3 fields"),
    "rank_gap": (("\n".join(_first_lines(300)[:150] + _first_lines(300)[151:])).encode(), "rank 150 is missing"),
    "duplicate_rank": (("\n".join(_first_lines(300)) + "\nIUFB 299\n").encode(), "rank 299 used twice"),
    "missing_bytes": (("\n".join(_first_lines(200))).encode(), "single-byte tokens are missing"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_non_tiktoken_file_is_rejected_clearly(name, tmp_path):
    content, reason = BAD_FILES[name]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as info:
        spec_tok.load_meta_tokenizer(path)
    message = str(info.value)
    assert str(path) in message and "tiktoken BPE" in message, message
    assert isinstance(info.value, spec_tok.TokenizerFileError)


def test_small_valid_tiktoken_file_loads(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(_first_lines(1000)) + "\n")
    tok = spec_tok.load_meta_tokenizer(path, vocab_size=1256)
    assert tok.bos_id == 1000 and tok.n_words == 1256
    assert tok.decode(tok.encode("hello world", bos=False, eos=False)) == "hello world"


def test_vocab_size_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"128256 ids .* vocab_size=32000"):
        spec_tok.load_meta_tokenizer(spec_tok.PACKAGED_TOKENIZER_PATH, vocab_size=32000)
    with pytest.raises(FileNotFoundError):
        spec_tok.load_meta_tokenizer("/nonexistent/tokenizer.model")


def _small_tiktoken_file(tmp_path, n_ranks=1000):
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(_first_lines(n_ranks)) + "\n")
    return path


SMALL_FILE_TEXTS = [CORPUS[name] for name in ("english", "python_code", "whitespace_runs", "digit_runs",
                                              "chinese", "emoji", "special_tokens_as_text")]


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    """The cache's mechanics on a 1000-rank file (quick to convert): a cold conversion is published as a
    `from_pretrained` directory with a digest and read back from it; the next load reads it without converting; an
    edited entry is rebuilt; every one of them gives Meta's ids (specials land at 1000.. here, not 128000..)."""
    path = _small_tiktoken_file(tmp_path)
    meta = spec_tok.load_meta_tokenizer(path)
    cache = tmp_path / "cache"

    def same_as_meta(tok):
        for text in SMALL_FILE_TEXTS:
            for bos, eos in ((False, False), (True, True)):
                assert rt.hf_encode(text, bos=bos, eos=eos, tokenizer=tok) == meta.encode(text, bos=bos, eos=eos)
        assert rt.hf_encode("<|eot_id|>", bos=False, eos=False, allowed_special="all", tokenizer=tok) == \
            [meta.special_tokens["<|eot_id|>"]] == [1009]

    cold = rt._load_or_convert(path.resolve(), cache, False)
    entries = list((cache / "tokenizer").iterdir())
    assert len(entries) == 1, entries
    entry = entries[0]
    assert {"tokenizer.json", "tokenizer_config.json", tok_cache.DIGEST_FILE} <= {f.name for f in entry.iterdir()}
    assert cold.name_or_path == str(entry), "the cold conversion should be returned as read back from disk"
    same_as_meta(cold)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache entry is intact")

    key = rt._cache_key(path.resolve())
    with monkeypatch.context() as patch:  # the key would change with the patched code (next test): pin it
        patch.setattr(rt, "_cache_key", lambda _path: key)
        patch.setattr(rt, "convert_hf_backend", no_conversion)
        patch.setattr(rt, "_wrap", no_conversion)
        warm = rt._load_or_convert(path.resolve(), cache, False)
    assert warm.name_or_path == str(entry)
    same_as_meta(warm)

    tokenizer_json = entry / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace('"ignore_merges": true', '"ignore_merges": false'))
    with pytest.warns(UserWarning, match="rebuilding unreadable tokenizer cache.*digest"):
        rebuilt = rt._load_or_convert(path.resolve(), cache, False)
    same_as_meta(rebuilt)
    assert tok_cache.file_digest(tokenizer_json) == (entry / tok_cache.DIGEST_FILE).read_text().strip()


def test_cache_key_follows_the_conversion_code(tmp_path, monkeypatch):
    """Conversion code edited or patched at run time (a planted bug, a mutant) gets its own cache entry."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = _small_tiktoken_file(tmp_path)
    base = rt._cache_key(path)
    keys = {base}
    with monkeypatch.context() as patch:
        patch.setattr(rt, "convert_hf_backend", lambda path, special_tokens: None)
        keys.add(rt._cache_key(path))
    with monkeypatch.context() as patch:
        patch.setattr(TikTokenConverter, "extract_vocab_merges_from_model", lambda self, url: ({}, []))
        keys.add(rt._cache_key(path))
    assert rt._cache_key(path) == base and len(keys) == 3
    path.write_text(path.read_text() + "\n")  # same ranks, other bytes
    assert rt._cache_key(path) != base


def test_unwritable_cache_still_converts(tmp_path):
    path = _small_tiktoken_file(tmp_path)
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        tok = rt._load_or_convert(path.resolve(), blocker, False)
    assert rt.hf_encode("hello world", bos=True, eos=False, tokenizer=tok) == \
        spec_tok.load_meta_tokenizer(path).encode("hello world", bos=True, eos=False)


def test_session_tokenizer_is_the_verified_cache_entry(hf_tok):
    """The full-size tokenizer every test here uses is the one read back from its cache entry (cold run or warm),
    and that entry's tokenizer.json still matches its digest."""
    entry = cache_root() / "tokenizer" / rt._cache_key(spec_tok.PACKAGED_TOKENIZER_PATH.resolve())
    if not entry.is_dir():
        pytest.skip(f"the tokenizer cache is not writable here ({entry}); the session converts in memory")
    assert hf_tok.name_or_path == str(entry)
    assert tok_cache.file_digest(entry / "tokenizer.json") == (entry / tok_cache.DIGEST_FILE).read_text().strip()


def test_conversion_reads_the_file_not_tiktoken_cache(tmp_path, monkeypatch):
    """tiktoken's loader caches files by *path*: after the file changes it still returns the old ranks. The
    conversion must read the file as it is now (Meta's loader does)."""
    from tiktoken.load import load_tiktoken_bpe

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))
    path = _small_tiktoken_file(tmp_path, 300)
    before = load_tiktoken_bpe(str(path))          # fills tiktoken's cache for this path
    lines = _first_lines(300)  # swap the ranks of the last two tokens, in place
    swapped = lines[:298] + [lines[299].split()[0] + " 298", lines[298].split()[0] + " 299"]
    path.write_text("\n".join(swapped) + "\n")
    now = spec_tok.read_tiktoken_ranks(path)
    assert now != before and load_tiktoken_bpe(str(path)) == before, "tiktoken's cache no longer keys by path"
    backend = rt.convert_hf_backend(path, spec_tok.load_meta_tokenizer(path).special_tokens)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    assert backend.get_vocab(with_added_tokens=False) == \
        {"".join(table[b] for b in token): rank for token, rank in now.items()}
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "tiktoken_cache"), "the setting was not restored"
