"""responses endpoint of the gateway (OpenAI's Responses API, translated onto chat completions)."""
