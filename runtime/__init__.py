"""The two runtimes several programs drive: ONNX Runtime sessions (`runtime.ort`) and llama.cpp
serving (`runtime.llama`). Each imports its library lazily, so importing one never loads the other."""
