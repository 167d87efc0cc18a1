"""The one text path: tokenizer loading, prompts (text, chat, ids) -> ids, and ids -> response text cut at
the first end-of-text and then at the first stop sequence. The engine, the server and the lm-eval
adapter all go through it; a generation's text is decoded once, here.
"""
from __future__ import annotations

import json
import logging
import numbers
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllm.models.config import CheckpointError, ModelConfig

from .errors import RequestError

log = logging.getLogger("dllm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class RemoteCodeRequired(CheckpointError):
    """The folder's tokenizer needs custom code the caller did not allow."""


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, or None when it has none. Custom tokenizer code (Dream's) only runs
    when the caller says so; nothing is fetched from a hub."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    tc = folder / "tokenizer_config.json"
    if tc.is_file() and not trust_remote_code:
        try:
            needs_code = "auto_map" in json.loads(tc.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{tc}: not valid JSON ({str(e)[:80]})") from None
        if needs_code:
            raise RemoteCodeRequired(f"{folder}: the tokenizer needs custom code (tokenizer_config.json has an "
                                     f"auto_map, as Dream's does); pass --trust-remote-code "
                                     f"(trust_remote_code=True) if you trust this folder, or use --prompt-ids")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()       # AutoTokenizer reads config.json too; its notices about the
    try:                                   # unknown model type are noise for a tokenizer load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                 local_files_only=True)
    except Exception as e:                 # tokenizers/transformers raise many types for one broken folder
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no message'}); the tokenizer files "
                              f"are missing, empty or corrupt") from None
    finally:
        hf_logging.set_verbosity(level)


def _is_id(t) -> bool:
    """A token id as a user may pass one: a python or numpy integer, never a bool."""
    return isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_))


def prompt_parts(prompt) -> tuple[str, list]:
    """A prompt as a caller may pass it -> ("text", [texts]) or ("ids", [[python ints]]), refusing any
    other type or shape (RequestError). Texts: a string, bytes (UTF-8) or a list of strings; ids: a
    list, tuple, 1-D numpy array or tensor of integers, or a batch of them (2-D array, list of lists)."""
    if hasattr(prompt, "tolist") and not isinstance(prompt, (str, bytes)):   # numpy array / torch tensor
        prompt = prompt.tolist()
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the prompt bytes are not valid UTF-8; pass text or token ids") from None
    texts = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(p, str) for p in texts):
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(f"the prompt is not valid UTF-8 text (character {e.start}: {text[e.start]!r}); "
                                   f"pass UTF-8 text or token ids") from None
        return "text", list(texts)
    if isinstance(prompt, (list, tuple)) and prompt and all(_is_id(t) for t in prompt):
        return "ids", [[int(t) for t in prompt]]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) or hasattr(p, "tolist")
                                                            for p in prompt):
        rows = [list(p.tolist() if hasattr(p, "tolist") else p) for p in prompt]
        for b, ids in enumerate(rows):
            if not all(_is_id(t) for t in ids):
                bad = [t for t in ids if not _is_id(t)][:5]
                raise RequestError(f"prompt {b}: token ids must be integers, got {bad}")
        return "ids", [[int(t) for t in ids] for ids in rows]
    raise RequestError(f"prompt must be a string, a list of strings, a list of integer token ids (or a 1-D "
                       f"integer array/tensor), or a list of token-id lists; got {type(prompt).__name__} "
                       f"{str(prompt)[:60]!r}")


@dataclass(frozen=True)
class Response:
    """One response row as text: cut at the first end-of-text, then before the first stop sequence."""
    text: str
    finish_reason: str        # "stop" (an end-of-text or a stop sequence) | "length"
    tokens: int               # response tokens before the end-of-text


class Text:
    """A model's text path, one per engine: the folder's tokenizer (loaded on first use), prompts -> ids
    (checked against the vocabulary and the mask id) and ids -> Response."""

    def __init__(self, cfg: ModelConfig, folder: Path | None, trust_remote_code: bool = False, defaults=None):
        self.cfg, self.folder, self.trust_remote_code = cfg, folder, trust_remote_code
        self.format = (re.compile(defaults.prompt_pattern), defaults.prompt_hint) \
            if defaults is not None and defaults.prompt_pattern else None
        self._tokenizer = None
        self._lock = threading.RLock()      # one caller at a time: a fast tokenizer is not safe to share
        self.end_ids = frozenset(t for t in (cfg.eos_id, cfg.eot_id) if t is not None)

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None and self.folder is not None:
                self._tokenizer = load_tokenizer(self.folder, self.trust_remote_code)
            return self._tokenizer

    def usable(self):
        """The tokenizer, or None when there is none (or it needs custom code the caller did not allow):
        an id prompt's output then has no text. A broken tokenizer is an error."""
        try:
            return self.tokenizer
        except RemoteCodeRequired:
            return None

    def _need(self):
        tok = self.tokenizer
        if tok is None:
            raise RequestError(f"{self.folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                               f"pass token ids instead (--prompt-ids 1,2,3)")
        return tok

    def _call(self, fn, *args):
        """A tokenizer / template call (one at a time), its failures as one RequestError."""
        try:
            with self._lock:
                return fn(*args)
        except (RequestError, CheckpointError):
            raise
        except Exception as e:              # a broken chat template (jinja) or tokenizer code
            raise RequestError(f"{self.folder}: the tokenizer failed on this prompt ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no message'}); its chat template or "
                               f"tokenizer files are broken") from None

    # ---------------------------------------------------------------- prompts -> ids

    def chat_text(self, messages: list[dict]) -> str:
        """A conversation through the folder's chat template, ready for the assistant's turn."""
        tok = self._need()
        if not getattr(tok, "chat_template", None):
            raise RequestError(f"{self.folder}: the tokenizer has no chat template; drop --chat")
        return self._call(lambda: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def encode(self, text: str, chat: bool = False, special: bool = True) -> list[int]:
        """Text -> ids. Chat: one user message through the chat template (which writes its own special
        tokens). Plain: the tokenizer's special prefix (BOS) is added unless the text already starts
        with it (a chat-templated string passed as text) or special is False (a continuation)."""
        return self.encode_chat([{"role": "user", "content": text}]) if chat else self._encode(text, special)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        for m in messages:
            prompt_parts(m.get("content") if isinstance(m, dict) and isinstance(m.get("content"), str) else "")
        return self._encode(self.chat_text(messages), False)

    def _encode(self, text: str, special: bool) -> list[int]:
        tok = self._need()
        plain = self._call(lambda: tok(text, add_special_tokens=False)["input_ids"])
        if not special:
            return plain
        full = self._call(lambda: tok(text)["input_ids"])
        n = len(full) - len(plain)
        return plain if n > 0 and full[:n] == plain[:n] else full

    def prompt_ids(self, prompt, chat: bool = False) -> list[list[int]]:
        """Any prompt a Request holds -> [B][P_b] ids, checked against the vocabulary and the mask id."""
        kind, parts = prompt_parts(prompt)
        if kind == "text":
            for t in parts:
                if self.format is not None and not chat and not self.format[0].fullmatch(t):
                    log.warning("warning: prompt %r is not in the format %s was trained on (%s); expect a wrong "
                                "answer%s", t[:60], self.folder, self.format[1] or self.format[0].pattern,
                                " (the trailing newline is missing)" if self.format[0].fullmatch(t + "\n") else "")
            rows = [self.encode(t, chat) for t in parts]
        else:
            if chat:
                raise RequestError("--chat applies a chat template to --prompt text; it cannot wrap --prompt-ids")
            self.usable()                       # ids: a broken tokenizer is refused now, not after generating
            rows = parts
        V, mask = self.cfg.vocab_size, self.cfg.mask_id
        for b, ids in enumerate(rows):
            if not ids:
                raise RequestError(f"prompt {b} is empty; give at least one token")
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise RequestError(f"prompt {b}: token ids {bad[:5]} are outside the vocabulary [0, {V})")
            if mask in ids:
                raise RequestError(f"prompt {b}: token id {mask} is the mask id; a prompt cannot contain masks")
        return rows

    # ---------------------------------------------------------------- ids -> text

    def decode(self, ids: list[int]) -> str:
        tok = self._need()
        return self._call(lambda: tok.decode(ids, skip_special_tokens=True))

    def response(self, ids: list[int], stops: tuple[str, ...] = ()) -> Response:
        """A whole response row (final tokens) as text."""
        text, stopped, used = self.cut(ids, stops, complete=True)
        return Response(text, "stop" if stopped else "length", used)

    def cut(self, ids: list[int], stops: tuple[str, ...] = (), complete: bool = True) -> tuple[str, bool, int]:
        """(text, finished, tokens before the end-of-text) of the final prefix `ids` of a response;
        `complete` when ids is the whole response. Text that could still become a stop sequence is held
        back while the response is incomplete (streaming)."""
        n = next((j for j, t in enumerate(ids) if t in self.end_ids), None)
        ended = n is not None
        used = n if ended else len(ids)
        text = self.decode(ids[:used])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)], True, used
        if ended or complete:
            return text, ended, used
        tails = [k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])]
        return text[:len(text) - max(tails, default=0)], False, used
