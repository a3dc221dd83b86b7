"""The Supervisely public API subset that headless Apps call through the SDK's `sly.Api`:
`POST /public/api/v3/<method>` (some methods GET) with the header `x-api-key: <App token>`.

- `tokens.py`: the per-task App token: minted when an `app` task is handed to its node, valid
  while the task is leased, scoped to these data methods;
- `registry.py`: the method table; each module registers its methods with `@method(name)`;
- `router.py`: the one route, authentication, the SDK's error bodies, unknown methods named;
- `read.py`, `write.py`, `files.py`, `tasks.py`: the methods themselves.
"""
