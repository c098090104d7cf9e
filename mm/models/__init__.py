"""The models: LLaVA, the multimodal (image + speech) model, the speech adapter, ASR, their processors and the
format table that opens checkpoints. The shipped weights live beside them in models/tiny and models/text-tiny."""
