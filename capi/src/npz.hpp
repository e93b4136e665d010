// Reads the float arrays of a NumPy .npz (a zip of .npy files, stored or deflated), enough for
// the authors' sensitivity tables. No Python and no NumPy: a zip directory walk, zlib's inflate,
// a CRC check and the .npy header.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

namespace sencache::npz {

struct Array {
    std::vector<double> values;  // converted to float64, as np.asarray(..., dtype=float64) does
    std::vector<long long> shape;
};

// The members named in `keys` (names without ".npy") that the archive holds; throws sencache::Error (SC_ERR_CORRUPT or
// SC_ERR_NOT_FOUND) naming the fault.
std::map<std::string, Array> load(const std::string& path, const std::set<std::string>& keys);

}  // namespace sencache::npz
