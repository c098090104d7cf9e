"""What users run: the `mm` command line, captioning and transcription, the Gradio chat."""
