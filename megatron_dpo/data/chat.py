"""Chat-form pairs -> text pairs, with the tokenizer's chat template.

As TRL does: the prompt text is the template applied to the prompt messages
with ``add_generation_prompt=True``; a completion's text is the template
applied to prompt + completion messages, minus that prompt text. The
prompt/completion boundary therefore sits after the assistant turn header and
the completion carries the template's end-of-turn markup (tokenize.py appends
EOS unless the text already ends with it). ``policy.tokenizer.chat_template``
replaces the tokenizer's own template.
"""

from dataclasses import replace
from typing import List

from megatron_dpo.data.errors import DataError
from megatron_dpo.data.formats import Messages, PreferencePair

_TEMPLATE_FIX = "set policy.tokenizer.chat_template to a Jinja chat template"


def render_chat(pairs: List[PreferencePair], tokenizer) -> List[PreferencePair]:
    """String pairs pass through; chat pairs become string pairs."""
    if all(isinstance(pair.prompt, str) for pair in pairs):
        return pairs
    bos_text = _bos_text_the_tokenizer_adds(tokenizer)
    return [pair if isinstance(pair.prompt, str) else _render(pair, tokenizer, bos_text) for pair in pairs]


def _bos_text_the_tokenizer_adds(tokenizer) -> str:
    """A template that writes BOS as text would double the BOS the tokenizer
    adds when encoding (Llama 3's does): that text is cut from the prompt."""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token if adds_bos else ""


def _render(pair: PreferencePair, tokenizer, bos_text: str) -> PreferencePair:
    if not tokenizer.chat_template:
        raise DataError(
            f"{pair.where}: a chat-form record (messages), but the tokenizer has no chat template; "
            f"{_TEMPLATE_FIX}, or give prompt / chosen / rejected as strings"
        )
    prompt = _apply(tokenizer, pair.prompt, pair.where, add_generation_prompt=True)
    chosen, rejected = (_completion_text(tokenizer, pair, prompt, name, messages)
                        for name, messages in (("chosen", pair.chosen), ("rejected", pair.rejected)))
    if bos_text and prompt.startswith(bos_text):
        prompt = prompt[len(bos_text):]
    return replace(pair, prompt=prompt, chosen=chosen, rejected=rejected)


def _completion_text(tokenizer, pair: PreferencePair, prompt: str, name: str, messages: Messages) -> str:
    full = _apply(tokenizer, pair.prompt + messages, pair.where, add_generation_prompt=False)
    if not full.startswith(prompt) or not full[len(prompt):].strip():
        raise DataError(
            f"{pair.where}: the chat template does not render the prompt (with add_generation_prompt=True) "
            f"as a prefix of the prompt + {name} conversation, so the {name} completion cannot be cut out "
            f"(prompt renders as {prompt[-80:]!r}, the conversation as {full[-120:]!r}); {_TEMPLATE_FIX} that does"
        )
    return full[len(prompt):]


def _apply(tokenizer, messages: Messages, where: str, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError) as error:
        raise DataError(f"{where}: the chat template fails on this record ({error}); fix the record or "
                        f"{_TEMPLATE_FIX} that accepts its roles") from error
