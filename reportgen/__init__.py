"""reportgen: config-driven HTML reports of what a PyTorch vision model does on a folder of images."""
