"""iosd.pipeline"""
