"""Chat-form pairs -> the texts TRL's DPOTrainer (1.16) tokenizes for them.

For conversational data TRL tokenizes, with ``apply_chat_template``:
  * the prompt: the prompt messages with ``add_generation_prompt=True``;
  * each sequence: prompt + completion messages, without a generation prompt.
``apply_chat_template`` encodes the rendered text without adding special
tokens (the template writes BOS where the model wants one) and TRL appends
nothing: the template's end-of-turn markup ends each completion. The
prompt / completion boundary is found on the tokens (tokenize.py), so a
template whose generation prompt is absent, or that renders the prompt alone
differently from the prompt inside the conversation, still works.
``policy.tokenizer.chat_template`` replaces the tokenizer's own template.
"""

from typing import Tuple

from megatron_dpo.data.errors import DataError
from megatron_dpo.data.formats import Messages, PreferencePair

_TEMPLATE_FIX = "set policy.tokenizer.chat_template to a Jinja chat template"


def render_chat(pair: PreferencePair, tokenizer) -> Tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) texts of a chat-form pair."""
    if not tokenizer.chat_template:
        raise DataError(
            f"{pair.where}: a chat-form record (messages), but the tokenizer has no chat template; "
            f"{_TEMPLATE_FIX}, or give prompt / chosen / rejected as strings"
        )
    prompt = _apply(tokenizer, pair.prompt, pair.where, add_generation_prompt=True)
    turns = _apply(tokenizer, pair.prompt, pair.where, add_generation_prompt=False)
    chosen, rejected = (_conversation(tokenizer, pair, turns, name, messages)
                        for name, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)))
    return prompt, chosen, rejected


def _conversation(tokenizer, pair: PreferencePair, turns: str, name: str, messages: Messages) -> str:
    """The prompt + ``name`` conversation, which must continue the prompt turns."""
    full = _apply(tokenizer, pair.prompt + messages, pair.where, add_generation_prompt=False)
    if not full.startswith(turns) or not full[len(turns):].strip():
        raise DataError(
            f"{pair.where}: the chat template does not render the prompt (with add_generation_prompt=False) "
            f"as a prefix of the prompt + {name} conversation, so the {name} completion cannot be cut out "
            f"(prompt renders as {turns[-80:]!r}, the conversation as {full[-120:]!r}); {_TEMPLATE_FIX} that does"
        )
    return full


def _apply(tokenizer, messages: Messages, where: str, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError) as error:
        raise DataError(f"{where}: the chat template fails on this record ({error}); fix the record or "
                        f"{_TEMPLATE_FIX} that accepts its roles") from error
