"""Tools around the project that users and tests run: the one-command demo (`tools.demo`) and
the local image builder (`tools.images`: task images and the agent's base image, no registry).
They drive the server through `client` only."""
