"""The ExecuTorch runner for the phone profiles: C++ sources and their build."""
