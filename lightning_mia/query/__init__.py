"""Query stage: generate for members and non-members, compute features, write shards."""
