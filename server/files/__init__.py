"""Team files (Supervisely "team files"): a team's file tree in the blob store.

`service` holds the tree's SQL and rules, `intake` streams bytes of unknown hash into the store,
`multipart` reads the SDK's multipart uploads as they stream, `router` is the user API
(`GET /api/v1/files`, `GET /api/v1/files/download`). Apps write and read the tree through the
public API (server/public/files.py).
"""
