"""How prompts become tokens, the same way in SFT, GRPO and evaluation; where generation stops.

TRL 1.16 tokenises a prompt-completion row in two ways, and evaluation mirrors both here:

- a text prompt with the tokenizer's defaults (``tokenizer(text=prompt)``: the tokenizer adds
  BOS itself when its post-processor says so);
- a chat prompt (a list of ``{"role", "content"}`` messages) with the model's chat template,
  ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``, which adds no
  special tokens beyond those the template writes, so BOS is never doubled.

Generation stops at every stop token the model declares: ``generation_config.eos_token_id``
(an id or a list, e.g. ``</s>`` and ``<|im_end|>``) plus the tokenizer's EOS, as GRPO does.

Light module: the tokenizer and model are passed in; nothing heavy is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stagebudget.errors import GenerationTooLong, ModelTaskError

MAX_CHECKED = 2000  # examples tokenised by the checks (a few seconds at most)
LONGEST_CHECKED = 256  # longest examples (by characters) tokenised by the window check
EVAL_SLACK = 2  # tokens past the longest answer that evaluation generates by default


def is_chat(prompt: Any) -> bool:
    """True for a list of chat messages (TRL's conversational format)."""
    return isinstance(prompt, list)


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a prompt exactly as TRL's SFT and GRPO trainers build them."""
    if is_chat(prompt):
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def sft_row(tokenizer: Any, example: Any) -> dict[str, Any]:
    """The SFT row of ``example``: ``{"prompt", "completion"}`` in TRL's format.

    Text prompts get the completion ``target + EOS`` (TRL adds EOS to text completions, and
    a generated answer ends there); chat prompts get one assistant message, whose end the
    chat template writes (e.g. ``<|im_end|>``).
    """
    if is_chat(example.prompt):
        return {"prompt": example.prompt,
                "completion": [{"role": "assistant", "content": example.target}]}
    return {"prompt": example.prompt, "completion": example.target + tokenizer.eos_token}


def prompt_completion_ids(tokenizer: Any, example: Any) -> list[int]:
    """Token ids of prompt + completion as TRL's SFT trainer builds them."""
    row = sft_row(tokenizer, example)
    if is_chat(example.prompt):
        out = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                            return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer(text=row["prompt"] + row["completion"])["input_ids"])


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token generation stops at: the model's declared EOS ids and the tokenizer's EOS.

    >>> class G: eos_token_id = [2, 7]
    >>> class M: generation_config = G()
    >>> class T: eos_token_id = 2
    >>> stop_token_ids(M(), T())
    [2, 7]
    """
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [declared] if isinstance(declared, int) else list(declared or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


def cut_at_stop(row: list[int], stops: list[int]) -> list[int]:
    """``row`` up to (not including) its first stop token.

    >>> cut_at_stop([5, 6, 7, 8, 2], [2, 7])
    [5, 6]
    """
    for i, tok in enumerate(row):
        if tok in stops:
            return row[:i]
    return row


def _describe(example: Any) -> str:
    prompt = example.prompt if not is_chat(example.prompt) else example.prompt[-1]["content"]
    return f"the {example.split} example with prompt {prompt!r} and answer {example.answer!r}"


def check_model_tasks(tokenizer: Any, suite: Any, model_ref: str = "the model") -> list[str]:
    """Check that ``suite``'s prompts tokenise cleanly with ``tokenizer``; return warnings.

    Raises :class:`ModelTaskError` for chat prompts without a chat template and for a prompt
    that starts with BOS twice. Warns (once, naming an example) when a tokenised prompt is not
    a prefix of the tokenised prompt + completion (BPE merges across the boundary, or a chat
    template that renders the prompt differently), so the model would train on a context it
    never sees at evaluation.
    """
    examples = [*suite.train, *suite.id_test, *suite.ood_test]
    if suite.conversational and not getattr(tokenizer, "chat_template", None):
        raise ModelTaskError(
            f"the tasks {suite.name} give prompts as chat messages, but the tokenizer of "
            f"{model_ref} has no chat template; use a model whose tokenizer_config.json has a "
            "chat_template, or write the prompts as plain text")
    bos = tokenizer.bos_token_id
    merged: list[Any] = []
    for example in examples[:MAX_CHECKED]:
        ids = prompt_ids(tokenizer, example.prompt)
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            raise ModelTaskError(
                f"{_describe(example)} starts with the BOS token {tokenizer.bos_token!r} twice "
                "once tokenised: the tokenizer adds BOS itself, so the prompt text must not; "
                "give the prompt as a list of chat messages (the chat template adds BOS once) "
                "or remove the BOS text from it")
        if example.split == "train":
            full = prompt_completion_ids(tokenizer, example)
            if full[:len(ids)] != ids:
                merged.append(example)
    if not merged:
        return []
    n_train = min(len(suite.train), MAX_CHECKED)
    why, fix = (("the chat template renders the prompt differently when the answer follows",
                 "use a chat template that renders the prompt the same way in both cases")
                if suite.conversational else
                ("the prompt's last token merges with the answer's first",
                 "end each prompt on a token boundary, e.g. with a separator such as '=' or a "
                 "newline"))
    return [f"{len(merged)} of {n_train} training prompts are not a prefix of prompt + answer "
            f"once tokenised ({why}; e.g. {_describe(merged[0])}): the model would train on "
            f"a prompt it never sees at evaluation. Fix: {fix}."]


def longest_answer_tokens(tokenizer: Any, suite: Any) -> int:
    """Tokens of the longest test target (its ``completion`` if given, else the answer), plus
    the chat template's end token for chat prompts."""
    longest = 0
    for example in [*suite.id_test, *suite.ood_test][:MAX_CHECKED]:
        longest = max(longest, len(tokenizer(text=example.target, add_special_tokens=False)
                                   ["input_ids"]))
    return longest + (1 if suite.conversational else 0)


def default_max_new_tokens(tokenizer: Any, suite: Any) -> int:
    """Evaluation's generation cap when the task sets none: longest target + EVAL_SLACK."""
    return longest_answer_tokens(tokenizer, suite) + EVAL_SLACK


def longest_sft_example(tokenizer: Any, suite: Any) -> int:
    """Tokens of the longest tokenised training example (prompt + completion)."""
    return max((len(prompt_completion_ids(tokenizer, ex)) for ex in suite.train), default=8)


def _chars(example: Any) -> int:
    prompt = example.prompt
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    return len(text) + len(example.target)


def check_prompt_window(suite: Any, window: int | None, count_prompt: Callable[[Any], int],
                        count_text: Callable[[str], int], model_ref: str = "the model",
                        train_generation: int = 0) -> None:
    """Refuse, before any compute, an example whose prompt cannot fit the model's position
    window together with what is generated after it (evaluation's ``max_new_tokens``, or the
    example's own target + EOS when longer, or ``train_generation``: the most tokens a
    generating stage writes, e.g. RL's ``max_completion_length``). A 1 MB prompt would otherwise
    reach SFT and GRPO whole (neither truncates prompts by default) and try to allocate tens of
    GB.

    ``count_prompt`` tokenises a prompt as training does (BOS, chat template); ``count_text`` a
    target without special tokens. The :data:`LONGEST_CHECKED` longest examples by characters
    are tokenised, so a huge file costs no more than a small one. ``window=None``: unknown, no
    check.
    """
    if window is None:
        return
    examples = [*suite.train, *suite.id_test, *suite.ood_test]
    tests = [*suite.id_test, *suite.ood_test][:MAX_CHECKED]
    generation = suite.max_new_tokens or (
        max((count_text(e.target) for e in tests), default=0)
        + (1 if suite.conversational else 0) + EVAL_SLACK)
    for example in sorted(examples, key=_chars, reverse=True)[:LONGEST_CHECKED]:
        n = count_prompt(example.prompt)
        written = max(int(generation), count_text(example.target) + 1, int(train_generation))
        if written >= window:  # no prompt fits: the generation length is what to change
            raise GenerationTooLong(
                f"{written} tokens are written after each prompt (the longest answer + "
                f"{EVAL_SLACK}, the task's max_new_tokens, or RL's max_completion_length), but "
                f"{model_ref} has {window} positions in all (max_position_embeddings in its "
                f"config), so no prompt fits; lower max_completion_length / max_new_tokens, or "
                "use a model with a longer context.",
                field=("stages.rl.max_completion_length" if written == train_generation
                       else "tasks"))
        if n + written > window:
            raise ModelTaskError(_window_message(suite, example, n, written, window, model_ref))


def _window_message(suite: Any, example: Any, n: int, written: int, window: int,
                    model_ref: str) -> str:
    where = (f"{suite.path}, line {example.line}" if suite.path is not None
             and example.line is not None else _describe(example)[:200])
    return (f"{where}: the prompt is {n} tokens long and {written} more tokens are written "
            f"after it (the longest answer + {EVAL_SLACK}, the task's max_new_tokens, this "
            f"row's own target + EOS, or RL's max_completion_length), {n + written} positions "
            f"in all, but {model_ref} has "
            f"{window} (max_position_embeddings in its config); nothing was trained. Shorten or "
            f"remove this row (prompts must stay at most {window - written} tokens long), or use a "
            "model with a longer context.")
