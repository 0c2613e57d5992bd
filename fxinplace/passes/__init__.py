"""FX passes over the graphs Dynamo hands to the backend, in the order the backend runs them.

- `trace_mutations/`: one run on fake tensors that records writes, storages and saved tensors.
- `resolve_aliases`: what each write really targets (parameter, buffer, input, intermediate).
- `split_tasks`: which task outputs each node feeds, and which parameters tasks share.
- `find_hazards`: which mutations break autograd, corrupt gradients or cross tasks (records).
- `functionalize/`: rewrite mutations out of place, keeping caller-visible writes.

What they share: `op_knowledge` (schema helpers and the tables of op facts schemas do not
state), `_graph_io` (one record per graph input, the graph's outputs) and `_storage`
(storage keys, version counters, overlap). The `_`-prefixed modules inside the two
packages are the parts of that pass.
"""
