"""Descriptor extraction, one job per module (import from the module that does the job):

* :mod:`isc.extract.decode` -- images -> normalised tensors: the eval transform, JPEG decoding where it is
  cheapest (CPU draft mode; nvJPEG on CUDA), the batch loader that reports bad files instead of raising;
* :mod:`isc.extract.describe` -- descriptors in memory: of tensors (with TTA), of image files, of the bytes
  of encoded images; the batch stream the writers consume;
* :mod:`isc.extract.streamed` -- DISC21 sets -> ISC21 descriptor h5 files in one process, streamed so host
  memory stays flat (:func:`~isc.extract.streamed.extract_descriptors`);
* :mod:`isc.extract.sharded` -- the same files from the ranks of a ``torchrun`` job, resumable per shard
  (:func:`~isc.extract.sharded.extract_descriptors_sharded`).

Nothing is re-exported here: one name per thing, so importing :mod:`isc.extract.describe` (the registry's
pyfunc does) does not pull in the h5 writers.
"""
