"""Datasets as the training script reads them: loaders, the synthetic demo data, VOC conversion."""
