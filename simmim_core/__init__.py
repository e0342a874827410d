"""The contract between training and serving, torch-free (numpy + Pillow).

  preprocess   decode, orient, convert, resize, crop and normalise an image: the one
               implementation used by evaluation, export, bulk embedding and the service
  model_dir    the model directory (model.json + ONNX files): its names, checks and hashes
  masking      SimMIM's mask generators
  visualize    masked inputs, reconstructions with the visible patches pasted back, the masked
               L1, side-by-side pictures and the training grid

`simmim_core.nn` holds the torch model code (encoders, decoders, losses, the SimMIM module);
importing `simmim_core` or any module above never imports torch.
"""
