"""The Conversations API (OpenAI's /v1/conversations): conversations whose items responses read and extend."""
