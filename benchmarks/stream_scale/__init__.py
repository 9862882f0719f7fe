"""Streamed shards at scale: shard time and bytes, loader memory over a long read, loader speed.

    python -m benchmarks.stream_scale shard --count 1000000 --out /tmp/shards
    python -m benchmarks.stream_scale read --dir /tmp/shards --checkpoints 10000 100000 1000000
    python -m benchmarks.stream_scale speed --dir /tmp/shards --size 336 --workers 14

``read`` reports the resident memory of the loader process and its workers (summed) at each
checkpoint: a stream must not grow with the number of samples read. ``speed`` times the
training loader (JPEG decode, the encoder's resize/crop/normalise, tokenisation, collation).
"""
