"""ConVIRT: contrastive image/text representations for medical retrieval.

The library every part of the project uses: encoders, projection heads, the loss, image loading and
augmentation, sentence sampling and the model bundle. No web, no FAISS, no optimiser here.
"""

__version__ = "0.1.0"
