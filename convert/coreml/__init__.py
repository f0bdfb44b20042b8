"""Core ML packages for iOS: the vision encoder (float16, enumerated slice shapes) from the shared export modules."""
