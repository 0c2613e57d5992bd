"""FX passes over the graphs Dynamo hands to the backend, one job per module.

- `trace_mutations`: one run on fake tensors that records writes, storages and saved tensors.
- `resolve_aliases`: what each write really targets (parameter, buffer, input, intermediate).
- `split_tasks`: which task outputs each node feeds, and which parameters tasks share.
- `find_hazards`: which mutations break autograd, corrupt gradients or cross tasks.
- `functionalize`: rewrite mutations out of place, keeping caller-visible writes.
"""
