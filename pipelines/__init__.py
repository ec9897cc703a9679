"""Pipeline stages: each reads its input shards, calls `retrieval`, and writes its output shards."""
