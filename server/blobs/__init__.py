"""The content-addressed blob store, who may read which blob, collection, thumbnails."""
