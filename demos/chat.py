"""Chat in the browser with a multimodal model (text, images, audio, microphone):
`python demos/chat.py --model DIR [--host 127.0.0.1] [--port 7860] [--max-upload-mb 10]`, then open the printed URL."""
import sys

from mm.apps.chat import run_chat

if __name__ == "__main__":
    sys.exit(run_chat())
