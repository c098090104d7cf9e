"""The project's own data: synthetic scenes with captions and questions, and speech made from them."""
