"""Column names and Arrow types of shard files, results and merged outputs.

Merged output = every input column, in input order, plus RESULT_COLUMNS:
  uid              string         stable prompt id (the id column's value, or derived from row + content)
  responses        list<string>   the n responses (empty list on an error row)
  response_tokens  list<int32>    generated tokens per response
  finish_reasons   list<string>   "stop" | "length" | "abort" per response
  stop_reasons     list<string>   the stop string / token that ended each response (null if none)
  sample_seeds     list<int64>    the seed of each response (prompt seed + sample index)
  prompt_tokens    int32          tokens of the rendered prompt
  error            string         null, or why this row has no responses
and, when asked for (sampling.logprobs / sampling.return_token_ids):
  token_ids            list<list<int32>>
  logprobs             list<list<float32>>   logprob of each chosen token
  cumulative_logprobs  list<float64>
and, with structured outputs (sampling.structured_outputs / data.structured_outputs_column):
  schema_valid         list<bool>            each response checked against its constraint (structured.py);
                                             null where the row has none or it cannot be checked (grammar)
and, with LoRA adapters (model.lora / data.lora_column):
  lora_adapter         string                the adapter directory the row was sampled with (null: base model)

Flattened output (one row per response) = input columns + uid, sample_index, response, response_tokens
(int32), finish_reason, stop_reason, sample_seed, prompt_tokens, error [+ token_ids, logprobs,
cumulative_logprob, schema_valid, lora_adapter].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from hpcrollout.engines.base import PromptResult

if TYPE_CHECKING:
    from hpcrollout.config import RunConfig

# Internal columns of shard files, parts and shard outputs. They carry a prefix no dataset uses, so every input
# column (a `row` or `id` of the user's own included) comes back from merge unchanged; an input column with the
# prefix is refused before the run.
INTERNAL_PREFIX = "_hpcr_"
ROW = "_hpcr_row"
UID = "_hpcr_uid"
INTERNAL_COLUMNS = (ROW, UID)

RESULT_FIELDS = [
    pa.field("uid", pa.string()),
    pa.field("responses", pa.list_(pa.string())),
    pa.field("response_tokens", pa.list_(pa.int32())),
    pa.field("finish_reasons", pa.list_(pa.string())),
    pa.field("stop_reasons", pa.list_(pa.string())),
    pa.field("sample_seeds", pa.list_(pa.int64())),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("error", pa.string()),
]
OPTIONAL_FIELDS = {
    "token_ids": pa.field("token_ids", pa.list_(pa.list_(pa.int32()))),
    "logprobs": pa.field("logprobs", pa.list_(pa.list_(pa.float32()))),
    "cumulative_logprobs": pa.field("cumulative_logprobs", pa.list_(pa.float64())),
    "schema_valid": pa.field("schema_valid", pa.list_(pa.bool_())),
    "lora_adapter": pa.field("lora_adapter", pa.string()),
}
# Every finish reason an engine records (engines/base.py): what `filter --finish_reason` accepts.
FINISH_REASONS = ("stop", "length", "abort")
RESULT_COLUMNS = tuple(f.name for f in RESULT_FIELDS) + tuple(OPTIONAL_FIELDS)
# Parts and shard outputs carry the global row first, so they can be sorted and checked against shard inputs.
PART_ROW = ROW


def result_schema(
    logprobs: bool = False, token_ids: bool = False, schema_valid: bool = False, lora: bool = False
) -> pa.Schema:
    fields = [pa.field(PART_ROW, pa.int64()), *RESULT_FIELDS]
    if token_ids:
        fields.append(OPTIONAL_FIELDS["token_ids"])
    if logprobs:
        fields += [OPTIONAL_FIELDS["logprobs"], OPTIONAL_FIELDS["cumulative_logprobs"]]
    if schema_valid:
        fields.append(OPTIONAL_FIELDS["schema_valid"])
    if lora:
        fields.append(OPTIONAL_FIELDS["lora_adapter"])
    return pa.schema(fields)


def run_result_schema(config: RunConfig) -> pa.Schema:
    """The result schema of a run: the optional columns its config asks for."""
    sp = config.sampling
    lora = config.model.lora is not None or config.data.lora_column is not None
    return result_schema(sp.logprobs, sp.return_token_ids, config.uses_structured_outputs(), lora)


def results_to_table(results: Sequence[PromptResult], schema: pa.Schema) -> pa.Table:
    """Results (any order) -> a table sorted by row, in the given result schema."""
    results = sorted(results, key=lambda r: r.row)
    cols: dict[str, list] = {name: [] for name in schema.names}
    for r in results:
        s = r.samples
        cols[PART_ROW].append(r.row)
        cols["uid"].append(r.uid)
        cols["responses"].append([x.text for x in s])
        cols["response_tokens"].append([x.num_tokens for x in s])
        cols["finish_reasons"].append([x.finish_reason for x in s])
        cols["stop_reasons"].append([x.stop_reason for x in s])
        cols["sample_seeds"].append([x.seed for x in s])
        cols["prompt_tokens"].append(r.prompt_tokens)
        cols["error"].append(r.error)
        if "token_ids" in cols:
            cols["token_ids"].append([x.token_ids or [] for x in s])
        if "logprobs" in cols:
            cols["logprobs"].append([x.logprobs or [] for x in s])
            cols["cumulative_logprobs"].append([x.cumulative_logprob for x in s])
        if "schema_valid" in cols:
            cols["schema_valid"].append([x.schema_valid for x in s])
        if "lora_adapter" in cols:
            cols["lora_adapter"].append(r.lora)
    return pa.table(cols, schema=schema)
