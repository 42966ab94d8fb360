"""Model doubles shared by tests (below the ``Model`` seam the worker runs)."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class RefusesBad:
    """Answers every prompt ("answer to PROMPT"), ends a prompt "bad" with ``refusal``,
    fails on a prompt "boom" once it has answered, and records the history each turn was
    given (``seen``)."""

    name: str = "refuses-bad"
    seen: list[list[tuple[str, str]]] = attrs.field(factory=list)

    async def run_turn(self, ctx: Any) -> str:
        self.seen.append(list(ctx.history))
        await ctx.text(f"answer to {ctx.prompt_text}")
        if ctx.prompt_text == "boom":
            raise RuntimeError("the model exploded")
        return "refusal" if ctx.prompt_text == "bad" else "end_turn"
