"""Media: decoding, frame sampling, face cropping, dataset manifests and the synthetic benchmark."""
