"""`dllm generate --live`: redraw the response canvas in place after every denoising step.

    view = LiveView(engine, out=sys.stdout)
    gen = engine.generate(prompt, gen_length=8, steps=8, on_step=view)
    view.finish(gen)

Each frame is a header (step number, step kind, milliseconds of the step, masks left) and the canvas:
one cell per response position, a dim `░` where the position is still masked, the token's text where it
is committed, and the tokens committed by this step in bold green. Special tokens (end of text, padding)
show as a dim `∎`, a newline inside a token as `⏎`. The next frame moves the cursor back up over the
previous one and draws over it (ANSI escapes), so the terminal shows the canvas filling in.
`finish` draws the last canvas, then prints the response text and one line of totals with tokens/s.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from typing import TextIO

from dllm.models.config import CheckpointError
from dllm.runtime import Generation, StepEvent

MASK_CELL = "░"
SPECIAL_CELL = "∎"

DIM = "\x1b[2m"
NEW = "\x1b[1;32m"            # bold green: committed by the step just shown
HEAD = "\x1b[1m"
RESET = "\x1b[0m"
CLEAR_BELOW = "\x1b[J"


def cursor_up(lines: int) -> str:
    """Move to the first column, `lines` lines up (ANSI CPL)."""
    return f"\x1b[{lines}F" if lines > 0 else "\r"


@dataclass(frozen=True)
class Cell:
    text: str          # what the cell shows (visible characters only)
    style: str         # an ANSI style prefix, "" for plain


def usable_tokenizer(engine):
    """The engine's tokenizer, or None when the folder has none usable (the cells then show ids)."""
    try:
        return engine.text.usable()
    except CheckpointError:
        return None


class LiveView:
    """An on_step observer that redraws the canvas in place; `finish(generation)` closes the view."""

    def __init__(self, engine, out: TextIO = sys.stdout, width: int | None = None):
        self.tokenizer = usable_tokenizer(engine)
        self.mask_id = engine.cfg.mask_id
        self.family = engine.cfg.family
        self.out = out
        self.width = width or shutil.get_terminal_size((80, 24)).columns
        self._special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        self._drawn = 0                    # lines of the frame now on screen
        self._ms: list[float] = []         # per-step milliseconds so far
        self._last: StepEvent | None = None

    # ------------------------------------------------------------------ cells

    def token_text(self, token_id: int) -> str:
        """A committed token as the canvas shows it (visible characters, never a bare newline)."""
        if token_id in self._special or self.tokenizer is None:
            return SPECIAL_CELL if self.tokenizer is not None else f"[{token_id}]"
        text = self.tokenizer.decode([token_id])
        return text.replace("\n", "⏎").replace("\r", "") or SPECIAL_CELL

    def cells(self, row: list[int], committed: set[int]) -> list[Cell]:
        out = []
        for j, t in enumerate(row):
            if t == self.mask_id:
                out.append(Cell(MASK_CELL, DIM))
            elif j in committed:
                out.append(Cell(self.token_text(t), NEW))
            elif t in self._special:
                out.append(Cell(SPECIAL_CELL, DIM))
            else:
                out.append(Cell(self.token_text(t), ""))
        return out

    def wrap(self, cells: list[Cell], prefix: str) -> list[str]:
        """Cells laid out in lines no wider than the terminal (so the redraw knows its height)."""
        lines, line, used = [], prefix, len(prefix)
        for c in cells:
            if used + len(c.text) > self.width and used > len(prefix):
                lines.append(line)
                line, used = " " * len(prefix), len(prefix)
            line += f"{c.style}{c.text}{RESET}" if c.style else c.text
            used += len(c.text)
        lines.append(line)
        return lines

    # ------------------------------------------------------------------ frames

    def frame(self, header: str, tokens: list[list[int]], committed: list[list[int]]) -> list[str]:
        lines = [f"{HEAD}{header}{RESET}"]
        for b, row in enumerate(tokens):
            prefix = f"[{b}] " if len(tokens) > 1 else ""
            lines += self.wrap(self.cells(row, set(committed[b]) if b < len(committed) else set()), prefix)
        return lines

    def draw(self, lines: list[str]) -> None:
        up = cursor_up(self._drawn) if self._drawn else ""
        self.out.write(up + CLEAR_BELOW + "\n".join(lines) + "\n")
        self.out.flush()
        self._drawn = len(lines)

    def __call__(self, event: StepEvent) -> None:
        self._ms.append(event.seconds * 1e3)
        self._last = event
        masked = sum(row.count(event.mask_id) for row in event.tokens)
        header = (f"step {event.index + 1}  {event.kind:<16} {event.seconds * 1e3:7.1f} ms  "
                  f"{masked} masked")
        self.draw(self.frame(header, event.tokens, event.committed))

    def finish(self, gen: Generation) -> None:
        """The final canvas (nothing highlighted), the response text, and the totals."""
        kinds = ", ".join(f"{k} {n}" for k, n in gen.step_kinds.items())
        mean = sum(self._ms) / len(self._ms) if self._ms else 0.0
        self.draw(self.frame(f"done  {gen.steps} steps ({kinds})  {mean:.1f} ms/step", gen.tokens, []))
        self._drawn = 0                    # what follows is never redrawn
        for b, ids in enumerate(gen.tokens):
            text = gen.text[b] if gen.text is not None else ",".join(map(str, ids))
            self.out.write(text + "\n")
        tokens = sum(len(t) for t in gen.tokens)
        self.out.write(f"{DIM}[{self.family}: {tokens} tokens, {gen.steps} steps, {gen.seconds:.3f} s, "
                       f"{gen.tokens_per_second:.1f} tok/s, backend {gen.backend}]{RESET}\n")
        self.out.flush()
