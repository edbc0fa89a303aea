"""Tool-calling environment: ``<tool>python: CODE</tool>`` runs in psirl's code sandbox.

    prompt        What is the sum of the squares of 1..20? Answer with the number.
    model turn 1  <tool>python: print(sum(i*i for i in range(1, 21)))</tool>
    env turn 1    <output>2870</output>
    model turn 2  2870</s>

Tools: ``python`` (the code runs through ``psirl.rewards.sandbox.run_in_sandbox`` with its
resource limits, no network, file writes only in a scratch folder; the observation is what the
program printed, standard output and standard error, last ``max_output_chars`` characters) and
``calc`` (``psirl.envs.calculator.safe_eval``, in-process). A turn without a tool call is the
final answer: reward 1 when its first line equals ``record["answer"]`` (done).
"""

from __future__ import annotations

import re
from typing import Any

from psirl.envs.calculator import ToolCallEnv, format_number, safe_eval
from psirl.rollout.episode import EnvStep

# The program's prints go to stderr, whose tail is what run_in_sandbox returns.
_PRINT_TO_STDERR = "import sys as _psirl_sys\n_psirl_sys.stdout = _psirl_sys.stderr\n"


def run_python(code: str, wall_time_s: float = 5.0, max_output_chars: int = 500) -> tuple[str, bool]:
    """(output, ok) of ``code`` run in the sandbox: ok is False on an exception or a timeout."""
    from psirl.rewards.sandbox import SandboxLimits, run_in_sandbox

    # One probe ("None") that is evaluated only if the whole program ran without an exception.
    result = run_in_sandbox(_PRINT_TO_STDERR + code, ["None"],
                            SandboxLimits(wall_time_s=wall_time_s))
    ok = (result.program_error is None and not result.timed_out
          and bool(result.values) and result.values[0] is not None)
    output = result.stderr_tail
    if result.timed_out:
        output += "\n[timed out]"
    return output.strip()[-max_output_chars:], ok


class PythonToolEnv(ToolCallEnv):
    """Tool calls in the form ``<tool>NAME: ARGUMENT</tool>``, NAME in ``tools``.

    tools: which tools are offered ("python", "calc"); wall_time_s / max_output_chars: the
    python tool's limits; output_template: the observation (``{output}`` is replaced).
    """

    def __init__(
        self,
        tools: tuple[str, ...] | list[str] = ("python", "calc"),
        wall_time_s: float = 5.0,
        max_output_chars: int = 500,
        output_template: str = "<output>{output}</output>",
    ):
        unknown = set(tools) - {"python", "calc"}
        if unknown:
            raise ValueError(f"env.kwargs.tools: unknown tools {sorted(unknown)}; "
                             f"known: python, calc")
        self.tools = tuple(tools)
        self.wall_time_s = float(wall_time_s)
        self.max_output_chars = int(max_output_chars)
        self.output_template = output_template
        self.stop = ("</tool>",)
        self._call = re.compile(r"<tool>\s*(\w+)\s*:(.*?)(?:</tool>|$)", re.DOTALL)
        self.record: dict[str, Any] = {}

    def call(self, match: re.Match) -> EnvStep:
        output, ok = self.run_tool(match.group(1), match.group(2).strip())
        return EnvStep(observation=self.output_template.format(output=output),
                       metrics={"tool_call": 1.0, "tool_ok": float(ok)})

    def run_tool(self, name: str, argument: str) -> tuple[str, bool]:
        """(output, ok) of one tool call."""
        if name not in self.tools:
            return f"unknown tool {name!r}; tools: {', '.join(self.tools)}", False
        if name == "calc":
            try:
                return format_number(safe_eval(argument)), True
            except ValueError as exc:
                return f"error: {exc}", False
        return run_python(argument, self.wall_time_s, self.max_output_chars)

    def demonstration(self, record: dict[str, Any]) -> list[tuple[str, bool]]:
        """The oracle episode on ``record`` as (text, written_by_model) segments, for an SFT
        cold start on tool use (train/sft.py with an ``env:`` section):

            [("<tool>python: print(12+34)</tool>", True), ("<output>46</output>", False),
             ("46", True)]

        The call runs the record's ``program`` (Python that prints the answer) with the python
        tool, else prints ``record["expression"]`` or the prompt without its trailing "=" (the
        ``addition`` task's "12+34=") with the python tool, or the calc tool when python is not
        offered. The tool really runs (the sandbox for python), and the observation is its real
        output. ValueError naming the record's prompt when the call fails or the output's last
        line is not ``record["answer"]``: the demonstration would teach a wrong answer.
        """
        if "answer" not in record:
            raise KeyError("record: a demonstration needs an 'answer' field")
        answer = str(record["answer"]).strip()
        where = f"record {record['prompt']!r}"
        if "program" in record:
            if "python" not in self.tools:
                raise ValueError(f"{where}: its 'program' needs the python tool; env.kwargs.tools "
                                 f"is {list(self.tools)}")
            name, argument = "python", str(record["program"]).strip()
        else:
            expression = str(record.get("expression", record["prompt"].strip().removesuffix("=")))
            name, argument = (("python", f"print({expression})") if "python" in self.tools
                              else ("calc", expression))
        output, ok = self.run_tool(name, argument)
        lines = output.strip().splitlines()
        if not ok or not lines or lines[-1].strip() != answer:
            raise ValueError(f"{where}: the {name} tool gave {output!r} (ok={ok}), whose last "
                             f"line is not the answer {answer!r}")
        return [(f"<tool>{name}: {argument}</tool>", True),
                (self.output_template.format(output=output), False),
                (answer, True)]
