"""ConVIRT: contrastive image/text representations for medical retrieval.

The library every part of the project uses (training/, index/ and service/ import it; it imports
none of them). No web, no FAISS, no optimiser here.

The model
    config.py          ModelConfig: the architecture, stored in every bundle
    encoders.py        the image CNN f_v and the text BERT f_u (mpnet.py: the larger text encoder)
    model.py           ConVIRT: two encoders, two projection heads, one joint space
    loss.py            the bidirectional contrastive loss
    bundle.py          a trained model on disk (weights, tokenizer, config, fingerprint)
    inference.py       Embedder: images and texts to joint-space vectors
    explain.py         occlusion heat-maps: why an image matched a query
Images and text
    imageio.py         PNG, JPEG and DICOM to 8-bit greyscale (decode_budget.py, codestreams.py:
                       a file's size checked before anything decodes it); viewpixels.py: 16-bit
                       values with the DICOM window, for a viewer
    transforms.py      training augmentation and the eval view
    imagecache.py      decoded images on disk, decoded once (cachebuild.py fills it on every core,
                       cache_cli.py is `convirt cache`)
    imagerecord.py     ImageRecord, what an image's one decode learnt (sizes, DICOM header fields
                       under one naming table, thumbnail): kept in the cache, staged and indexed
    manifest.py        CSV/JSONL manifests: rows, items and skips
    sentences.py       reports split into sentences; findings.py: what a sentence asserts
The int8 query encoder
    int8_graph.py      the text tower as an int8 ONNX graph (export, calibration, rewrite)
    quantize.py        the artefact in the bundle, its checks, the served encoder, `convirt export`
Shared plumbing
    cli.py             the `convirt` command (cli_options.py: --device, --model, --no-progress
                       and command_parser, shared by every subcommand's parser)
    paths.py           where data, caches and packaged weights live
    hashing.py         sha256_file, for every file the project checks

A query's path through the library: a sentence -> inference.Embedder.embed_texts (tokeniser,
model.ConVIRT's text tower, or quantize's int8 encoder) -> a unit vector the index searches.
A new image format goes in imageio.py (and decode_budget.py for its size checks); a new encoder
in encoders.py, named by config.py.
"""

__version__ = "0.1.0"
