"""`validate_data_config`: every problem in `data.*`, for either data kind, as one error before
any work starts (the token data's checks are in recipes.data.validation, the chat data's in
recipes.data.chat_validation)."""

from __future__ import annotations

from falcon_h1.errors import ConfigValueError
from recipes.data.bundled import BUNDLED
from recipes.data.chat_validation import data_kind_problems, validate_chat_data_config
from recipes.data.tokenizer_files import BYTE_SPEC, resolve_tokenizer_file
from recipes.data.validation import (PATHS_HELP, index_files_problem, missing_files_problem, parse_blend,
                                     raise_problems, split_and_length_problems)


def validate_data_config(data_cfg) -> None:
    """Raise one ConfigValueError listing every problem in `data.*`, before any work starts."""
    if data_cfg.kind == "chat":
        return validate_chat_data_config(data_cfg)
    prefixes, _ = parse_blend(data_cfg.paths)
    unusable = [(prefix, problem) for prefix in prefixes
                if prefix != BUNDLED and (problem := missing_files_problem(prefix) or index_files_problem(prefix))]
    problems = []
    if unusable:
        problems.append(ConfigValueError("data.paths", unusable[0][0], PATHS_HELP,
                                         message=" ".join([problem for _, problem in unusable] + [PATHS_HELP])))
    problems += data_kind_problems(data_cfg)
    if data_cfg.tokenizer != BYTE_SPEC:
        try:
            resolve_tokenizer_file(str(data_cfg.tokenizer))
        except ConfigValueError as error:
            problems.append(error)
    problems += split_and_length_problems(data_cfg, 1)
    raise_problems(problems)
