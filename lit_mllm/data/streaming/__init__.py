"""Sharded corpora streamed with LitData: ``shard`` writes chunks, ``dataset`` reads them.

``record``: one sample as a LitData item (JSON text + the image files as stored);
``shard``: a source (COCO, Karpathy, LLaVA, synthetic) -> validated chunks, in parallel;
``dataset``: chunks -> training items through the same :class:`SampleProcessor` as map-style
data, mixed by weight across streams, split over ranks and workers and resumable by LitData.
"""
