"""The prompts and clips that calibration and the builder share: calibration prompts with the
built-in video prompts of real models (`prompts`), draws from the tiny models' prompt grammar
(`grammar`) and the tiny models' procedural training clips (`clips`). Above the runtime (whose
`tiny_grammar` defines the grammar), below the builder, calibration and the benchmarks."""
