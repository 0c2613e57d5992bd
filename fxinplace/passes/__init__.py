"""FX passes over the graphs Dynamo hands to the backend, one job per module.

- `trace_mutations`: one run on fake tensors that records writes, storages and saved tensors.
- `resolve_aliases`: what each write really targets (parameter, buffer, input, intermediate).
- `split_tasks`: which task outputs each node feeds, and which parameters tasks share.
- `find_hazards`: which mutations break autograd, corrupt gradients or cross tasks.
- `functionalize`: rewrite mutations out of place, keeping caller-visible writes.

What they share: `op_knowledge` (schema helpers and the tables of op facts schemas do not
state) and `_graph_io` (one record per graph input, the graph's outputs). The `_`-prefixed
modules are the parts of one pass: `_tracing_interpreter`, `_saved_tensors`, `_hop_runs`,
`_hop_facts`, `_mutation_facts` and `_storage` of `trace_mutations`; `_functionalize_*` of
`functionalize`.
"""
