"""`qwen3next chat`: an interactive multi-turn chat in the terminal.

Commands: /reset clears the history, /system TEXT sets the system prompt, /exit (or Ctrl-D) quits. Ctrl-C while
the model is answering stops that answer and keeps the session; Ctrl-C at the prompt quits.
"""
from __future__ import annotations

import sys

from .engine.sampling_params import SamplingParams
from .parsers import ReasoningParser

DIM, RESET = "\033[2m", "\033[0m"


def run_chat(llm, params: SamplingParams, system: str | None = None, enable_thinking: bool | None = None,
             stdin=sys.stdin, stdout=sys.stdout) -> int:
    color = stdout.isatty()
    history: list[dict] = []

    def say(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    say("qwen3next chat — /reset, /system TEXT, /exit. Ctrl-C stops an answer.\n")
    while True:
        try:
            say("\n> ")
            line = stdin.readline()
        except KeyboardInterrupt:
            say("\n")
            return 0
        if not line:                      # Ctrl-D / end of input
            say("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            say("(history cleared)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history.clear()
            say(f"(system prompt {'set' if system else 'cleared'}; history cleared)\n")
            continue
        history.append({"role": "user", "content": line})
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        prompt = llm.render_chat(msgs, enable_thinking=enable_thinking)
        parser = ReasoningParser(starts_in_reasoning=prompt.rstrip().endswith("<think>"))
        answer = []
        try:
            for out in llm.stream(prompt, params):
                reasoning, content = parser.feed(out.outputs[0].delta_text)
                if reasoning:
                    say(f"{DIM}{reasoning}{RESET}" if color else reasoning)
                if content:
                    answer.append(content)
                    say(content)
        except KeyboardInterrupt:
            say(" [stopped]")
        reasoning, content = parser.flush()
        if content:
            answer.append(content)
            say(content)
        say("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
