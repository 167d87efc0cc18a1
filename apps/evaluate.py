"""The runtime as an lm-evaluation-harness model, registered under the name `dllm`.

    dllm eval --model dllm --model_args model=DIR,policy=dllm-cache,kp=100,kr=7,rho=0.25,dtype=bfloat16,\
gen_length=256,steps=256,block_length=32 --tasks gsm8k --batch_size 8 [--include_path DIR]

    import lm_eval
    from dllm.apps.evaluate import DllmLM
    lm_eval.simple_evaluate(model=DllmLM(model=DIR, policy="d2cache"), tasks=["gsm8k"])

`dllm eval ARGS...` is lm-eval's own command line (`lm-eval run ARGS...`) with this model registered;
the arguments pass through unchanged. Model arguments are the `dllm generate` options, dashes as
underscores (EvalConfig below: the engine's, the evaluation's, and every Request option through the one
option parser), validated with the same messages; a bad one is one RequestError line (exit status 2
under `dllm eval`), reported before lm-eval starts.

Requests:
- generate_until: prompts batched (`--batch_size`) per generation shape, longest first, each batch
  left-padded to its longest prompt (or to `prompt_bucket`); the response is cut at the first
  end-of-text, then at the first stop sequence. A request's `max_gen_toks` m becomes the generation
  length G = m rounded up to a multiple of block_length (G = m with one block), with
  steps = ceil(G * steps / gen_length) rounded up to a multiple of the block count G / block_length;
  tokens beyond m are dropped (Request.text_tokens). Requests without max_gen_toks use gen_length
  (default: the model folder's generation_config.json, else 128).
- loglikelihood: the Monte-Carlo estimate these models are evaluated with (LLaDA's get_log_likelihood):
  per sample draw l ~ U{1..|answer|}, mask l answer positions chosen uniformly, sum the cross-entropy
  of the masked positions weighted by |answer| / l; average over mc_num samples. Every request draws
  from a generator seeded with `seed`, so results are deterministic and the choices of one question
  share their masks (common random numbers). Identical mask draws are evaluated once and weighted by
  their count (the same number, fewer forwards). is_greedy: the runtime's own greedy decoding (the
  configured policy, gen_length tokens or |answer| if longer) starts with the answer.
- loglikelihood_rolling: the same estimator over disjoint windows of the model's maximum length.

Efficiency, per task, printed after each generate_until call (`report=false` silences it) and kept in
`DllmLM.efficiency`: tokens/s = generated tokens up to the first end-of-text over the summed wall time
of the generation calls (Generation.seconds: fill, all steps, read-back; preparation excluded and
reported apart); forwards per token = steps x batch rows over those tokens; the step kinds; and the
speedup against NoCache, timed on the same batches right after each one (`baseline=false` skips it).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from lm_eval._cli.ls import List
from lm_eval._cli.run import Run
from lm_eval._cli.validate import Validate
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, setup_logging, simple_parse_args_string
from tqdm import tqdm

from dllm.apps.common import error_exit, expected_errors
from dllm.graphs import BACKENDS
from dllm.models.config import ModelConfig, load_config
from dllm.models.hub import resolve_model
from dllm.models.layers import forward
from dllm.models.quant import Quantization
from dllm.runtime import Engine, GenerationDefaults, NoCache, Request, RequestError
from dllm.runtime.device import DTYPE_CHOICES
from dllm.runtime.options import coerce, policy_option_names, request_options
from dllm.runtime.request import OPTION_FIELDS


@dataclass(frozen=True)
class EvalConfig:
    """The model arguments: the engine's (model, dtype, device, backend, trust_remote_code), the
    evaluation's (below), and every Request option (`request`: the one option parser, typed by Request's
    and the policies' fields; lengths left out take the model folder's generation_config.json)."""
    model: str = ""
    dtype: str = "auto"
    device: str = "cpu"
    backend: str | None = None
    trust_remote_code: bool = False
    quantize: str = "none"                # none | int8 | int4 (Engine.from_pretrained's)
    quantize_group: int | None = None
    quantize_head: bool = False
    batch_size: int = 1                   # prompts per generation batch (lm-eval's --batch_size; "auto" = 64)
    max_batch_size: int | None = None     # the batch for batch_size=auto
    mc_num: int = 128                     # Monte-Carlo samples per log-likelihood
    mc_batch: int = 16                    # samples per forward pass
    greedy_check: bool = True             # decode each loglikelihood answer to report is_greedy
    max_length: int | None = None         # longest canvas (default: the model's maximum sequence length)
    baseline: bool = True                 # time NoCache on every batch for the speedup
    report: bool = True                   # print the efficiency table after generate_until
    request: Request = field(default_factory=Request)   # everything else: Request's options

    @classmethod
    def parse(cls, args: dict) -> "EvalConfig":
        """Model arguments as lm-eval hands them over (strings, or already ints/floats/bools) -> EvalConfig;
        RequestError names the unknown or ill-typed argument."""
        own = {f.name: f for f in fields(cls) if f.name != "request"}
        valid = [*own, *(f.name for f in OPTION_FIELDS), *policy_option_names()]
        unknown = sorted(set(args) - set(valid))
        if unknown:
            raise RequestError(f"unknown model argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                               f"valid: {', '.join(dict.fromkeys(valid))}")
        if not args.get("model"):
            raise RequestError("model argument 'model' is required: the checkpoint folder (model=DIR)")
        values = {}
        for k, v in args.items():
            if k in own:
                values[k] = "auto" if k == "batch_size" and str(v) == "auto" else coerce(k, v, own[k].type, text=True)
        if values.get("batch_size") == "auto":
            values["batch_size"] = values.get("max_batch_size") or 64
        request = Request(**request_options({k: v for k, v in args.items() if k not in own}, text=True))
        cfg = cls(**values, request=request)
        cfg.check()
        return cfg

    def check(self) -> None:
        for name in ("batch_size", "mc_num", "mc_batch"):
            if getattr(self, name) < 1:
                raise RequestError(f"model argument {name} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise RequestError(f"model argument max_length must be >= 2 (a prompt token and a response token), "
                               f"got {self.max_length}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise RequestError(f"unknown device {self.device!r}; choose cpu or cuda")
        if self.dtype not in DTYPE_CHOICES:
            raise RequestError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise RequestError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")

    def label(self) -> str:
        """The configuration in words, e.g. 'dllm-cache kp 8 kr 4 rho 0.25, threshold 0.9'."""
        r = self.request
        out = " ".join([r.policy.name] + [f"{k} {v}" for k, v in r.policy.params().items()])
        if r.block_length is not None:
            out += f", block {r.block_length}"
        if r.threshold is not None:
            out += f", threshold {r.threshold}"
        return out


def check_model_args(args: dict) -> tuple[EvalConfig, ModelConfig]:
    """Validate model arguments without loading weights: the arguments themselves, the policy, the
    checkpoint's config.json and generation_config.json, the request against them. Raises RequestError /
    CheckpointError with the CLI's messages."""
    cfg = EvalConfig.parse(args)
    folder = resolve_model(cfg.model)
    mcfg = load_config(folder)
    Quantization(cfg.quantize, cfg.quantize_group, cfg.quantize_head).check(mcfg)
    request = cfg.request.resolved(GenerationDefaults.read(folder))
    request.shape_check()
    request.check(mcfg)
    if cfg.max_length is not None and cfg.max_length <= request.gen_length:
        raise RequestError(f"model argument max_length {cfg.max_length} leaves no room for a prompt before "
                           f"gen_length {request.gen_length}; give a max_length above it")
    return cfg, mcfg


@dataclass(frozen=True)
class GenShape:
    gen_length: int
    steps: int
    block_length: int


def gen_shape(request: Request, max_tokens: int, defaults: GenerationDefaults | None = None) -> GenShape:
    """The generation shape for a request of at most max_tokens tokens: G is max_tokens rounded up to a
    multiple of block_length (no block length: one block, G = max_tokens); steps keep the configured
    steps per token (steps / gen_length), rounded up to a multiple of the block count G / block_length."""
    r = request.resolved(defaults)
    if request.block_length is None and r.block_length == r.gen_length:
        G, block = max_tokens, max_tokens
    else:
        block = r.block_length
        G = -(-max_tokens // block) * block
    n_blocks = G // block
    steps = -(-G * r.steps // r.gen_length)
    steps = max(n_blocks, -(-steps // n_blocks) * n_blocks)
    return GenShape(G, steps, block)


@dataclass
class Efficiency:
    """What the generation calls of one task cost."""
    requests: int = 0
    tokens: int = 0                  # generated tokens before the first end-of-text
    seconds: float = 0.0             # summed Generation.seconds (capture excluded)
    forwards: int = 0                # steps x batch rows
    prepare_seconds: float = 0.0
    baseline_seconds: float = 0.0    # NoCache on the same batches (0 when not measured)
    step_kinds: Counter = field(default_factory=Counter)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def forwards_per_token(self) -> float:
        return self.forwards / self.tokens if self.tokens else float("nan")

    @property
    def speedup(self) -> float | None:
        return self.baseline_seconds / self.seconds if self.baseline_seconds and self.seconds > 0 else None

    def row(self, task: str, label: str) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.step_kinds.items())
        speed = f"{self.speedup:.2f}×" if self.speedup is not None else "not measured"
        return (f"| {task} | {label} | {self.requests} | {self.tokens} | {self.seconds:.3f} | "
                f"{self.tokens_per_second:.1f} | {self.forwards_per_token:.2f} | {kinds} | {speed} |")


EFFICIENCY_HEADER = ("| task | configuration | requests | tokens | seconds | tokens/s | forwards/token | step kinds "
                     "| speedup vs NoCache |\n|---|---|---|---|---|---|---|---|---|")
EFFICIENCY_NOTE = ("tokens = generated tokens up to the first end-of-text; seconds = wall time of the generation "
                   "calls (compile/capture excluded); forwards/token = steps x batch rows per token; speedup = "
                   "NoCache on the same batches / these seconds")


@dataclass(frozen=True)
class GenItem:
    index: int
    task: str
    prompt: list[int]
    max_tokens: int
    until: tuple[str, ...]
    temperature: float


@register_model("dllm")
class DllmLM(LM):
    """lm-eval model over one Engine. Keywords: EvalConfig's fields and Request's options; `engine=` reuses
    a loaded Engine (then model/dtype/device/backend/trust_remote_code describe it and are not loaded again)."""

    def __init__(self, engine: Engine | None = None, **model_args):
        super().__init__()
        if engine is not None:
            model_args.setdefault("model", str(engine.folder))
        self.config, _ = check_model_args(model_args)
        c = self.config
        self.engine = engine or Engine.from_pretrained(c.model, device=c.device, dtype=c.dtype, backend=c.backend,
                                                       trust_remote_code=c.trust_remote_code, quantize=c.quantize,
                                                       quantize_group=c.quantize_group, quantize_head=c.quantize_head)
        self.request = c.request.resolved(self.engine.defaults)      # lengths set: the model's defaults
        mcfg = self.engine.cfg
        if self.engine.tokenizer is None:
            raise RequestError(f"{c.model} has no tokenizer files; lm-eval tasks are text, so the folder needs one")
        self.max_length = c.max_length or mcfg.max_seq_len or 4096
        self.efficiency: dict[str, Efficiency] = {}
        self._device = self.engine.device

    # ------------------------------------------------------------------ lm-eval hooks

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "DllmLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "DllmLM":
        """lm-eval's own flags (--batch_size, --max_batch_size, --device) fill what the model arguments
        leave out. Its --device defaults to cuda:0; on a machine without CUDA that default means cpu."""
        args = dict(arg_dict)
        for key, value in (additional_config or {}).items():
            if value is None or key in args:
                continue
            if key == "device" and str(value).startswith("cuda") and not torch.cuda.is_available():
                continue
            args[key] = value
        return cls(**args)

    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.folder).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.engine.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise RequestError("dllm generates the assistant's turn: lm-eval asked for a chat template without "
                               "the generation prompt")
        return self.engine.text.chat_text(chat_history)

    # ------------------------------------------------------------------ generate_until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        items = [self._gen_item(i, r) for i, r in enumerate(requests)]
        out: list[str | None] = [None] * len(items)
        groups = defaultdict(list)
        for it in items:
            shape = gen_shape(self.config.request, it.max_tokens, self.engine.defaults)
            groups[(it.task, shape, it.temperature, it.until, it.max_tokens)].append(it)
        seen_tasks = []
        bar = tqdm(total=len(items), desc="dllm: generating", unit="request", disable=disable_tqdm, file=sys.stderr,
                   dynamic_ncols=True)
        for (task, shape, temperature, _until, _m), group in groups.items():
            group.sort(key=lambda it: -len(it.prompt))          # longest first: less padding per batch
            eff = self.efficiency.setdefault(task, Efficiency())
            seen_tasks.append(task)
            for lo in range(0, len(group), self.config.batch_size):
                batch = group[lo:lo + self.config.batch_size]
                for it, text in zip(batch, self._generate_batch(batch, shape, temperature, eff)):
                    out[it.index] = text
                    self.cache_hook.add_partial("generate_until", requests[it.index].args, text)
                bar.update(len(batch))
        bar.close()
        if self.config.report:
            self.print_efficiency(dict.fromkeys(seen_tasks))
        return out

    def _gen_item(self, index: int, request) -> GenItem:
        context, kwargs = request.args
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or ()
        until = tuple(s for s in ((until,) if isinstance(until, str) else until) if s)
        max_tokens = int(kwargs.get("max_gen_toks") or self.request.gen_length)
        temperature = float(kwargs.get("temperature", self.request.temperature) or 0.0)
        if kwargs.get("do_sample") is False:
            temperature = 0.0
        prompt = self.engine.encode(context)
        room = self.max_length - gen_shape(self.config.request, max_tokens, self.engine.defaults).gen_length
        if room < 1:
            raise RequestError(f"max_gen_toks {max_tokens} leaves no room for a prompt in {self.max_length} tokens")
        return GenItem(index, request.task_name or "default", prompt[-room:], max_tokens, until, temperature)

    def _generate(self, prompts: list[list[int]], shape: GenShape, **changes):
        """The configured request for these prompts at this shape (changes: per-call fields)."""
        return self.engine.generate(replace(self.config.request, prompt=prompts, gen_length=shape.gen_length,
                                            steps=shape.steps, block_length=shape.block_length, **changes))

    def _generate_batch(self, batch: list[GenItem], shape: GenShape, temperature: float, eff: Efficiency) -> list[str]:
        prompts = [it.prompt for it in batch]
        per_call = dict(temperature=temperature, stop=batch[0].until, text_tokens=batch[0].max_tokens)
        gen = self._generate(prompts, shape, **per_call)
        eff.tokens += sum(gen.completion_tokens)
        eff.requests += len(batch)
        eff.seconds += gen.seconds
        eff.prepare_seconds += gen.prepare_seconds
        eff.forwards += gen.steps * len(batch)
        eff.step_kinds.update(gen.step_kinds)
        if self.config.baseline:
            if self.request.policy.name == "none" and self.request.threshold is None:
                eff.baseline_seconds += gen.seconds                   # this run is the baseline
            else:
                eff.baseline_seconds += self._generate(prompts, shape, policy=NoCache(), threshold=None,
                                                       **per_call).seconds
        return gen.text

    def print_efficiency(self, tasks=None) -> None:
        print(f"\ndllm efficiency ({EFFICIENCY_NOTE}):\n{EFFICIENCY_HEADER}")
        for task in tasks or self.efficiency:
            print(self.efficiency[task].row(task, self.config.label()))
        print(flush=True)

    # ------------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*r.args) for r in requests]
        lls = [self.mc_loglikelihood(prefix, answer) for prefix, answer in pairs]
        greedy = self.greedy_flags(pairs) if self.config.greedy_check else [False] * len(pairs)
        out = list(zip(lls, greedy))
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            (text,) = r.args
            ids = self.engine.text.encode(text, special=False)
            windows = get_rolling_token_windows(ids, prefix_token=self.engine.cfg.bos_id,
                                                max_seq_len=self.max_length, context_len=1)
            ll = sum(self.mc_loglikelihood(*make_disjoint_window(w)) for w in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, ll)
            out.append(ll)
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(prefix ids, answer ids): the answer is what the whole text adds after the context's tokens."""
        if not context:
            return [self.engine.cfg.bos_id], self.engine.text.encode(continuation, special=False)
        whole, prefix = self.engine.encode(context + continuation), self.engine.encode(context)
        if whole[:len(prefix)] != prefix:            # a merge across the boundary: encode the parts apart
            return prefix, self.engine.text.encode(continuation, special=False)
        return prefix, whole[len(prefix):]

    def mask_draws(self, n_answer: int) -> Counter:
        """mc_num draws of answer positions to mask -> {sorted positions: count}."""
        g = torch.Generator().manual_seed(self.request.seed)
        draws = Counter()
        for _ in range(self.config.mc_num):
            n_masked = int(torch.randint(1, n_answer + 1, (1,), generator=g))
            draws[tuple(sorted(torch.randperm(n_answer, generator=g)[:n_masked].tolist()))] += 1
        return draws

    @torch.inference_mode()
    def mc_loglikelihood(self, prefix: list[int], answer: list[int]) -> float:
        """Monte-Carlo log p(answer | prefix): minus the mean over mc_num draws of the masked answer
        positions' cross-entropy times |answer| / (number masked)."""
        A, mcfg = len(answer), self.engine.cfg
        if A == 0:
            return 0.0
        prefix = prefix[-(self.max_length - A):] if self.max_length > A else prefix[-1:]
        if mcfg.shift_logits and not prefix:
            prefix = [mcfg.bos_id]
        P, dev = len(prefix), self.engine.device
        seq = torch.tensor(prefix + answer, device=dev)                       # [L]
        target = seq[P:]                                                      # [A]
        draws = list(self.mask_draws(A).items())
        total = 0.0
        for lo in range(0, len(draws), self.config.mc_batch):
            chunk = draws[lo:lo + self.config.mc_batch]
            masked = torch.zeros(len(chunk), A, dtype=torch.bool, device=dev)  # [n, A]
            for row, (positions, _) in enumerate(chunk):
                masked[row, list(positions)] = True
            canvas = seq.repeat(len(chunk), 1)                                # [n, L]
            canvas[:, P:] = torch.where(masked, mcfg.mask_id, target)
            logits = forward(self.engine.weights, mcfg, canvas,
                             torch.zeros(len(chunk), dtype=torch.int64, device=dev))  # [n, L, V]
            rows = logits[:, P - 1:P - 1 + A] if mcfg.shift_logits else logits[:, P:P + A]  # [n, A, V]
            logp = F.log_softmax(rows.float(), dim=-1).gather(-1, target.expand(len(chunk), A)[..., None])[..., 0]
            nll = -(logp * masked).sum(-1) * A / masked.sum(-1)               # [n]
            counts = torch.tensor([c for _, c in chunk], dtype=nll.dtype, device=dev)
            total += float((nll * counts).sum())
        return -total / self.config.mc_num

    def greedy_flags(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether the runtime's greedy decoding after the prefix starts with the answer. It decodes
        gen_length tokens (|answer| when longer), the canvas the model answers on, not |answer| tokens:
        a diffusion model's output depends on the canvas length."""
        flags = [False] * len(pairs)
        by_len = defaultdict(list)
        for i, (_, answer) in enumerate(pairs):
            if answer:
                by_len[len(answer)].append(i)
            else:
                flags[i] = True
        for A, idx in by_len.items():
            shape = gen_shape(self.config.request, max(A, self.request.gen_length), self.engine.defaults)
            room = self.max_length - shape.gen_length
            for lo in range(0, len(idx), self.config.batch_size):
                batch = idx[lo:lo + self.config.batch_size]
                gen = self._generate([pairs[i][0][-room:] for i in batch], shape, temperature=0.0)
                for i, ids in zip(batch, gen.tokens):
                    flags[i] = ids[:A] == pairs[i][1]
        return flags


def main(argv: list[str]) -> int:
    """`dllm eval ARGS...`: lm-eval's command line (run, ls, validate; `run` when none is named) with the
    `dllm` model registered. Bad model arguments: one line on stderr, exit status 2."""
    parser = argparse.ArgumentParser(prog="dllm eval", description="lm-evaluation-harness with the runtime as "
                                     "model 'dllm' (--model dllm --model_args model=DIR,...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (Run, List, Validate):
        command.create(sub)
    argv = list(argv)
    if not argv or argv[0] not in sub.choices:
        argv = ["run", *argv]
    args = parser.parse_args(argv)
    try:
        if getattr(args, "model", None) == "dllm":      # refuse bad model arguments before lm-eval starts
            model_args = args.model_args or {}
            check_model_args(simple_parse_args_string(model_args) if isinstance(model_args, str) else model_args)
        setup_logging()
        args.func(args)
    except expected_errors() as e:
        return error_exit(str(e))
    return 0
