"""The DeepSeek family's published chat templates, verbatim (jinja source as in tokenizer_config.json).

Used by the runtime when a bundle carries no template of its own, and by the test fixtures. Standard
library only: the on-device runtime imports this module.
"""

from __future__ import annotations

__all__ = ["DEEPSEEK_R1", "DEEPSEEK_R1_2501", "DEEPSEEK_V2", "DEEPSEEK_V3", "FAMILIES", "R1_DISTILL",
           "R1_DISTILL_2501", "bounded_render", "family_for_model_type",
           "sandboxed_environment"]

# deepseek-ai/DeepSeek-V2-Chat and DeepSeek-V2-Lite-Chat tokenizer_config.json "chat_template" (the same text
# as deepseek-llm-7b-chat's), as reproduced in ggml-org/llama.cpp tests/test-chat-template.cpp (entry
# "DeepSeek-V2") and in a copy of the V2-Lite-Chat tokenizer_config.json. "User: …\n\nAssistant:" turns.
DEEPSEEK_V2 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# deepseek-ai/DeepSeek-V3(-Base) tokenizer_config.json "chat_template": /work/shared/configs/
# DeepSeek-V3-Base.tokenizer_config.json (koko12356780/helpy @ 810f724c, an upload of the HF files; its
# '\n' literals hold real newlines). Assistant turns are kept verbatim (no </think> stripping).
DEEPSEEK_V3 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + "
    "tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}"
    "{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}"
    "{{'<｜Assistant｜>'}}{% endif %}"
)

# deepseek-ai/DeepSeek-R1 tokenizer_config.json "chat_template" of 2025-01-22: /work/shared/configs/
# DeepSeek-R1.tokenizer_config.json (itounagi0116/DeepSeek-R1, a clone of the HF repo keeping its history).
# The generation prompt is "<｜Assistant｜>" without "<think>\n"; assistant turns lose their reasoning
# (content.split('</think>')[-1]).
DEEPSEEK_R1_2501 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
    "is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' "
    "+ tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' "
    "+ '```' + '<｜tool▁call▁end｜>'}}{%- else %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' "
    "+ tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' "
    "+ tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] "
    "+ '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' "
    "+ '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}"
    "{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-32B tokenizer_config.json "chat_template" before the think update
# (Evilcarbon/DeepSeek-R1-Distill-Qwen-32B @ d5e56233); R1-Distill-Llama-8B carries the same text (ggml-org/
# llama.cpp models/templates/deepseek-ai-DeepSeek-R1-Distill-{Qwen-32B,Llama-8B}.jinja, re-indented there).
R1_DISTILL_2501 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}"
    "{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + "
    "'```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + "
    "'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}"
    "{{'<｜Assistant｜>'}}{% endif %}"
)

# DeepSeek's later update of the R1 and R1-Distill tokenizer_config.json changed only the generation prompt,
# to force the opening think tag (their README: R1 sometimes skips thinking; "we recommend enforcing the
# model to initiate its response with <think>\n"). Quoted in full from huggingface.co/deepseek-ai/DeepSeek-R1
# main in public write-ups; the distills' updated text is in llama.cpp models/templates (above).
_PLAIN_PROMPT = "{{'<｜Assistant｜>'}}{% endif %}"
_THINK_PROMPT = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"


def _forcing_think(template: str) -> str:
    assert template.endswith(_PLAIN_PROMPT), "template tail changed"  # our own constants, checked at import
    return template[: -len(_PLAIN_PROMPT)] + _THINK_PROMPT


DEEPSEEK_R1 = _forcing_think(DEEPSEEK_R1_2501)
R1_DISTILL = _forcing_think(R1_DISTILL_2501)

# Built-in templates by family name (what `--template` accepts).
FAMILIES: dict[str, str] = {
    "deepseek-v2": DEEPSEEK_V2,
    "deepseek-v3": DEEPSEEK_V3,
    "deepseek-r1": DEEPSEEK_R1,
    "r1-distill": R1_DISTILL,
}

# A bundle without a template gets its family's from the manifest's model_type. deepseek_v3 is V3 or R1
# (the config does not say which): V3's template, as R1 chat needs its own tokenizer files anyway.
_FAMILY_BY_MODEL_TYPE = {"deepseek_v2": "deepseek-v2", "deepseek_v3": "deepseek-v3", "qwen2": "r1-distill",
                         "llama": "r1-distill"}


def family_for_model_type(model_type: str | None) -> str | None:
    """The built-in template family for a config ``model_type`` (None when there is none)."""
    return _FAMILY_BY_MODEL_TYPE.get(model_type or "")


# --- bounded rendering -------------------------------------------------------------------------------
# A template comes with the model's files, so it is untrusted code. jinja2's sandbox stops attribute escapes and
# caps one range() at 100,000 items, but not nested loops (range(100000) inside range(100000) renders for hours),
# string growth (`'x' * 10**9`, doubling by `~` in a loop) or width arguments (`'x'|center(10**9)`). Rendering
# is bounded by time and by size: every string the template builds and the output stay under MAX_RENDER_CHARS,
# and a render stops after MAX_RENDER_SECONDS. Published chat templates render in about a millisecond.
MAX_RENDER_SECONDS = 2.0
MAX_RENDER_CHARS = 4 << 20  # 4 Mi characters: far beyond any context a prompt must fit in


class RenderLimit(Exception):
    """A template went past the rendering bounds (turned into a UserError by ``bounded_render``)."""


def _checked_size(value, limit: int = MAX_RENDER_CHARS):
    if isinstance(value, str | bytes | list | tuple | dict) and len(value) > limit:
        raise RenderLimit(f"the template built a value of {len(value)} items, more than the {limit} allowed")
    return value


def _checked_args(args, kwargs, limit: int = MAX_RENDER_CHARS) -> None:
    # Widths and counts (center, ljust, zfill, indent, repeat…) beyond the output bound can only blow up memory.
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise RenderLimit(f"the template passed the number {value} to a function, more than the {limit} allowed")


def sandboxed_environment(**options):
    """jinja2's immutable sandbox with size bounds on concatenation, arithmetic, calls and filters."""
    import functools

    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node, frame):  # `a ~ b`: check the joined string's size
            self.write("environment.checked_size(")
            super().visit_Concat(node, frame)
            self.write(")")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"+", "*", "**"})

        @staticmethod
        def checked_size(value):
            return _checked_size(value)

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64 and left not in (0, 1, -1):
                raise RenderLimit(f"the template raises to the power {right}, more than 64 allowed")
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                    if sized and len(seq) * times > MAX_RENDER_CHARS:
                        raise RenderLimit(f"the template repeats {len(seq)} items {times} times, more than "
                                          f"{MAX_RENDER_CHARS} in all")
            return _checked_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 — jinja2's own signature
            _checked_args(args, kwargs)
            return _checked_size(super().call(__context, __obj, *args, **kwargs))

    def bounded_filter(func):
        @functools.wraps(func)  # keeps jinja's pass_context / pass_eval_context marks
        def run(*args, **kwargs):
            _checked_args(args, kwargs)
            return _checked_size(func(*args, **kwargs))

        return run

    env = BoundedEnvironment(**options)
    env.filters = {name: bounded_filter(func) for name, func in env.filters.items()}
    return env


def bounded_render(template, variables: dict, *, where: str, seconds: float = MAX_RENDER_SECONDS,
                   max_chars: int = MAX_RENDER_CHARS) -> str:
    """``template.render(**variables)`` within ``seconds`` and ``max_chars`` (UserError naming ``where``).

    Time is checked on every line the render executes (a trace function on this thread only, so that a loop
    which writes nothing is stopped too); the previous trace function (a debugger, coverage) is restored."""
    import sys
    import time

    from dsedge.errors import UserError  # reason: this module is otherwise stdlib-only data

    deadline = time.monotonic() + seconds

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise RenderLimit(f"rendering took longer than {seconds:g} s")
        return tracer

    previous = sys.gettrace()
    pieces, size = [], 0
    sys.settrace(tracer)
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > max_chars:
                raise RenderLimit(f"the rendered prompt passed {max_chars} characters")
            pieces.append(piece)
    except RenderLimit as exc:
        raise UserError(f"the chat template went past its rendering bounds: {exc}", where=where,
                        hint="the template loops or grows without end; fix it, or pick another with --template"
                        ) from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)
