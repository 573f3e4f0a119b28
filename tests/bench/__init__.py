"""Tests of bench/: the benches at tiny sizes on the CPU, the quality records and the GPU check runner."""
