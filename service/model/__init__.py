"""The model: one thread owns it, every encoder call goes through it.

engine.py          Engine: image decoding (decode pool), micro-batched text and image encoder
                   calls on the model thread
batching.py        MicroBatcher: requests that arrive together share one encoder call
region.py          Box: a region of an image to search by, and its crop
threads.py         the model thread, the search pool and the decode pool, each with its own
                   OpenMP team
loading.py         the bundle (and int8 query encoder) and the index read at start
explainer.py       heat-maps: a bounded queue and a cache in front of the worker
explain_worker.py  the heat-map worker (a process, or a thread); explain_process.py runs in it
"""
