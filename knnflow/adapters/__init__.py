"""Drop-in knnflow targets for other libraries' training loops.

- `knnflow.adapters.torchcfm.KNNFlowMatcher`: torchcfm's matcher interface
  (`sample_location_and_conditional_flow`).
- `knnflow.adapters.flow_matching.KNNEFMPath`: flow_matching's path interface (`sample`).

Neither library is a dependency of knnflow; each adapter only follows its interface.
"""
